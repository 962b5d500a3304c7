"""PPO maths against values computed by hand."""

import math

import pytest
import torch

from alignment.algorithms.gae import gae
from alignment.algorithms.ppo import (
    AdaptiveKLController,
    kl_estimate,
    kl_shaped_rewards,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)


def test_three_step_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    # gamma 0.9, lam 0.5:
    # delta2 = 1 - 0.4 = 0.6;              A2 = 0.6
    # delta1 = 0 + 0.9*0.4 - 0.2 = 0.16;    A1 = 0.16 + 0.45*0.6 = 0.43
    # delta0 = 0 + 0.9*0.2 - 0.5 = -0.32;   A0 = -0.32 + 0.45*0.43 = -0.1265
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([-0.1265, 0.43, 0.6])
    assert ret.tolist()[0] == pytest.approx([0.3735, 0.63, 1.0])


def test_gae_stops_at_padding():
    rewards = torch.tensor([[0.0, 2.0, 5.0]])
    values = torch.tensor([[1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A1 = 2 - 1 = 1 (no bootstrap from the padded step); A0 = 0 + 1 - 1 + 1 = 1
    assert adv.tolist()[0] == pytest.approx([1.0, 1.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([2.0, 2.0, 0.0])


def test_masked_whiten_and_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    # mean 2, unbiased var 1 -> [-1, 0, 1], padding stays 0
    assert masked_whiten(x, mask).tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)


def test_kl_estimators():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 = (q/p - 1) - log(q/p) with q/p = 0.5: -0.5 + log 2 = 0.193147
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k2")


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = kl_shaped_rewards(torch.tensor([1.0, -1.0]), kl, mask, kl_coef=0.1)
    assert r.tolist()[0] == pytest.approx([-0.01, 0.98, 0.0])
    assert r.tolist()[1] == pytest.approx([-0.05, -0.05, -1.05])


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, 1.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 ; token 1: max(-0.5, -0.8) = -0.5 ; mean -0.85
    assert loss.item() == pytest.approx(-0.85)
    assert stats["clipfrac"] == 1.0
    # approx_kl = mean((r - 1) - log r) = ((0.5 - log 1.5) + (-0.5 - log 0.5)) / 2
    assert stats["approx_kl"] == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), clip=0.5)
    # token 0: unclipped (1-2)^2 = 1, clipped V = 0.5 -> (0.5-2)^2 = 2.25 -> 2.25 ; token 1: 1 and 1 -> 1
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert value_loss(values, old, returns, torch.ones(1, 2), clip=None)[0].item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(current_kl=2.0, n_samples=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    # error -0.5 is clipped to -0.2
    assert ctl.update(current_kl=0.5, n_samples=10) == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))


def test_minibatches_cover_every_sample_each_epoch_and_stop_on_approx_kl():
    import torch

    from stages.online import Minibatches

    torch.manual_seed(0)
    loop = Minibatches(10, epochs=2, size=4, target_kl=0.5)
    seen = []
    for mb in loop:
        seen.append(mb.tolist())
        loop.record(pg_loss=1.0, approx_kl=0.1)
    assert [len(b) for b in seen] == [4, 4, 2, 4, 4, 2]  # 2 epochs x ceil(10 / 4) minibatches
    assert sorted(sum(seen[:3], [])) == list(range(10)) and not loop.stopped
    assert loop.means() == pytest.approx({"pg_loss": 1.0, "approx_kl": 0.1})

    loop = Minibatches(10, epochs=2, size=4, target_kl=0.5)
    steps = 0
    for _ in loop:
        steps += 1
        loop.record(approx_kl=0.6 if steps == 2 else 0.1)  # the second step overshoots: no third step
    assert steps == 2 and loop.stopped and abs(loop.means()["approx_kl"] - 0.35) < 1e-12
