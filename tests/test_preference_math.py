"""Bradley-Terry loss against values computed by hand; reward normalisation; win rate."""

import math

import pytest
import torch

from alignment.algorithms.preference import bradley_terry_loss, pairwise_accuracy
from alignment.evaluation import win_rate
from reward_models import Composite, Normalized, RuleReward, ToyGoldReward

# A loss must build its tensors on its inputs' device: "meta" catches a CPU tensor on any machine (it cannot be mixed
# with a meta tensor), the `gpu` variant runs the same check on CUDA where there is one.
DEVICES = ["meta", pytest.param("cuda", marks=(pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="runs on CUDA")))]


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(-0.5) = log(1 + e^0.5) = 0.974077
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx((0.313262 + 0.974077) / 2, abs=1e-5)
    # margin 0.5: log(1 + e^-0.5) = 0.474077; log(1 + e^1) = 1.313262
    assert bradley_terry_loss(chosen, rejected, 0.5).item() == pytest.approx((0.474077 + 1.313262) / 2, abs=1e-5)
    per_row = bradley_terry_loss(chosen, rejected, torch.tensor([0.0, 0.5])).item()
    assert per_row == pytest.approx((0.313262 + 1.313262) / 2, abs=1e-5)
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    assert pairwise_accuracy(chosen, rejected) == 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_bradley_terry_margin_per_row_follows_the_rewards_device(device):
    chosen = torch.tensor([1.0, 0.0], device=device, requires_grad=True)
    rejected = torch.tensor([0.0, 0.5], device=device)
    margin = torch.tensor([0.0, 0.5])  # as the reward stage builds it from its rows' `margin` values
    loss = bradley_terry_loss(chosen, rejected, margin)
    assert loss.device.type == device and loss.shape == ()
    loss.backward()
    if device != "meta":
        assert loss.item() == pytest.approx((0.313262 + 1.313262) / 2, abs=1e-5)


def test_win_rate_ties_count_half():
    assert win_rate([1, 0.5, 0.2, 0.3], [0.5, 0.5, 0.9, 0.3]) == (1 + 0.5 + 0 + 0.5) / 4


def test_normalisation_running_and_fixed():
    rule = RuleReward("tests.test_preference_math:length_reward")
    running = Normalized(rule)
    out = running.score(["p"] * 4, ["a", "a b", "a b c", "a b c d"])  # raw 1, 2, 3, 4: mean 2.5, std 1.118
    assert out.tolist() == pytest.approx([(x - 2.5) / math.sqrt(1.25) for x in (1, 2, 3, 4)], abs=1e-5)
    fixed = Normalized(rule, mean=1.0, std=2.0, clip=1.0)
    assert fixed.score(["p"] * 2, ["a b c", "a b c d e f g"]).tolist() == [1.0, 1.0]  # (3-1)/2 = 1, (7-1)/2 clipped
    assert fixed.score(["p"], ["a b"]).tolist() == [0.5]


def test_composite_and_toy_gold():
    gold = ToyGoldReward().score(["review of the soup in paris :"] * 2, [" the soup was good .", " the soup was bad ."])
    assert gold.tolist() == pytest.approx([0.65, 0.3], abs=1e-5)  # 0.8 * (0.125 review + 0.875 * 1/2) + 0.2 format;
    # a negative review: 0.8 * 0.125 + 0.2
    both = Composite([(1.0, RuleReward("tests.test_preference_math:length_reward")), (2.0, ToyGoldReward())])
    assert both.score(["review of the soup in paris :"] * 2, [" the soup was good .", " the soup was bad ."]).shape == (2,)


def length_reward(prompt: str, completion: str) -> float:
    return float(len(completion.split()))
