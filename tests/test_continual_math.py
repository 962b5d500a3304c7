"""Continual-learning maths against hand-computed values: accuracy-matrix metrics, task weights, EWC, fusion."""

from __future__ import annotations

import pytest
import torch

from alignment.algorithms.continual import continual_metrics, dynamic_weight_average, static_weights
from alignment.algorithms.ewc import ewc_penalty, fisher_diagonal, normalize_fisher, online_fisher
from alignment.algorithms.fusion import fusion_attention

R = [
    [0.9, 0.4, 0.5],
    [0.6, 0.8, 0.45],
    [0.5, 0.7, 0.95],
]


def test_metrics_of_a_plain_chain_by_hand():
    m = continual_metrics(R, trained_at=[0, 1, 2], baseline=[0.5, 0.5, 0.5])
    assert m["avg_acc"] == pytest.approx((0.5 + 0.7 + 0.95) / 3, abs=1e-4)  # 0.7167
    # bwt = ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    assert m["bwt"] == pytest.approx(-0.25)
    # forgetting: task 0 max(0.9, 0.6) - 0.5 = 0.4; task 1 max(0.8) - 0.7 = 0.1
    assert m["forgetting"] == pytest.approx(0.25)
    # fwt = ((R[0][1] - 0.5) + (R[1][2] - 0.5)) / 2 = (-0.1 - 0.05) / 2
    assert m["fwt"] == pytest.approx(-0.075)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    acc = [[0.6, 0.5], [0.9, 0.8], [0.7, 0.8]]  # task 0 got better after stage 1, then dropped
    m = continual_metrics(acc, trained_at=[0, 1])
    assert m["bwt"] == pytest.approx(((0.7 - 0.6) + (0.8 - 0.8)) / 2)  # 0.05: bwt compares with right after training
    assert m["forgetting"] == pytest.approx(((0.9 - 0.7) + 0.0) / 2)  # 0.1: forgetting compares with the best


def test_fusion_chain_counts_every_task_against_its_own_adapter():
    # rows 0-2: each task's own adapter right after its training; row 3: the fused model
    acc = [[1.0, 0.5, 0.5], [0.5, 0.9, 0.5], [0.5, 0.5, 0.8], [0.98, 0.88, 0.8]]
    m = continual_metrics(acc, trained_at=[0, 1, 2])
    assert m["bwt"] == pytest.approx((-0.02 - 0.02 + 0.0) / 3, abs=1e-4)  # rounded to 4 digits
    assert m["avg_acc"] == pytest.approx((0.98 + 0.88 + 0.8) / 3, abs=1e-4)


def test_single_row_and_unevaluated_entries_are_undefined_not_zero():
    m = continual_metrics([[0.9, 0.8, 0.7]], trained_at=[0, 0, 0], baseline=[0.5, 0.5, 0.5])
    assert m == {"avg_acc": pytest.approx(0.8), "bwt": None, "fwt": None, "forgetting": None}
    seen_only = [[0.9, None], [0.6, 0.8]]  # `evaluate: seen`: task 1 not evaluated before its training
    m = continual_metrics(seen_only, trained_at=[0, 1], baseline=[0.5, 0.5])
    assert m["fwt"] is None and m["bwt"] == pytest.approx(-0.3)
    with pytest.raises(ValueError):
        continual_metrics(R, trained_at=[0, 1])


def test_task_weights_by_hand():
    assert static_weights(None, 3) == [1.0, 1.0, 1.0]
    assert static_weights([1, 1, 2], 3) == pytest.approx([0.75, 0.75, 1.5])  # rescaled to sum to 3
    assert dynamic_weight_average(None, [1.0, 1.0]) is None
    # ratios r = [0.5/1.0, 1.0/1.0] = [0.5, 1.0]; T = 1: 2 * softmax([0.5, 1.0])
    e1, e2 = torch.exp(torch.tensor(0.5)), torch.exp(torch.tensor(1.0))
    expected = [float(2 * e1 / (e1 + e2)), float(2 * e2 / (e1 + e2))]
    assert dynamic_weight_average([0.5, 1.0], [1.0, 1.0], temperature=1.0) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------------- EWC


def test_fisher_equals_hand_computed_per_sample_squared_gradients():
    """y = w.x + b, loss_n = (y_n - t_n)^2 / 2: d/dw = (y - t) x, d/db = (y - t)."""
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    b = torch.tensor(0.25, requires_grad=True)
    xs = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0]])
    ts = torch.tensor([1.0, 0.0, 2.0])
    losses = [lambda x=x, t=t: 0.5 * (w @ x + b - t) ** 2 for x, t in zip(xs, ts)]
    fisher = fisher_diagonal({"w": w, "b": b}, losses, normalize=False)

    # residuals y - t: 0.5 - 2 + 0.25 - 1 = -2.25;  0 + 1 + 0.25 - 0 = 1.25;  1.5 - 1 + 0.25 - 2 = -1.25
    # F_w0 = ((-2.25 * 1)^2 + (1.25 * 0)^2 + (-1.25 * 3)^2) / 3 = (5.0625 + 0 + 14.0625) / 3 = 6.375
    # F_w1 = ((-2.25 * 2)^2 + (1.25 * -1)^2 + (-1.25 * 1)^2) / 3 = (20.25 + 1.5625 + 1.5625) / 3 = 7.791667
    # F_b  = (5.0625 + 1.5625 + 1.5625) / 3 = 2.729167
    hand_w, hand_b = [6.375, 7.791667], 2.729167
    assert fisher["w"].tolist() == pytest.approx(hand_w, abs=1e-5)
    assert fisher["b"].item() == pytest.approx(hand_b, abs=1e-5)
    normalized = fisher_diagonal({"w": w, "b": b}, losses)
    mean = (sum(hand_w) + hand_b) / 3
    assert normalized["w"].tolist() == pytest.approx([h / mean for h in hand_w])
    assert torch.cat([normalized["w"], normalized["b"].reshape(1)]).mean().item() == pytest.approx(1.0)


def test_fisher_of_a_batch_is_not_the_square_of_the_batch_gradient():
    """Per-sample gradients matter: two samples with opposite gradients cancel in a batch but not in the Fisher."""
    w = torch.tensor(1.0, requires_grad=True)
    fisher = fisher_diagonal({"w": w}, [lambda: w * 2.0, lambda: -w * 2.0], normalize=False)
    assert fisher["w"].item() == pytest.approx(4.0)


def test_ewc_penalty_is_zero_at_the_anchor_and_pulls_back_towards_it():
    anchor = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]])}
    fisher = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([[4.0]])}
    params = {k: v.clone().requires_grad_(True) for k, v in anchor.items()}
    assert ewc_penalty(params, fisher, anchor).item() == 0.0
    with torch.no_grad():
        params["a"] += torch.tensor([0.5, 3.0])  # the second entry has zero Fisher: moving it costs nothing
        params["b"] += 0.25
    penalty = ewc_penalty(params, fisher, anchor)
    assert penalty.item() == pytest.approx(2.0 * 0.25 + 0.0 * 9.0 + 4.0 * 0.0625)
    penalty.backward()
    assert params["a"].grad.tolist() == pytest.approx([2 * 2.0 * 0.5, 0.0])  # 2 F (theta - theta*)
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    before = {k: (params[k] - anchor[k]).abs().detach().clone() for k in params}
    for _ in range(5):
        optimizer.zero_grad()
        ewc_penalty(params, fisher, anchor).backward()
        optimizer.step()
    assert (params["a"] - anchor["a"]).abs()[0] < before["a"][0] * 0.5  # pulled back
    assert (params["a"] - anchor["a"]).abs()[1] == before["a"][1]  # unimportant: left alone
    assert (params["b"] - anchor["b"]).abs().item() < before["b"].item() * 0.5


def test_ewc_penalty_without_terms_is_a_zero_on_the_parameters_device():
    params = {"a": torch.zeros(2, device="meta")}
    penalty = ewc_penalty(params, {}, {})
    assert penalty.device.type == "meta" and penalty.shape == ()


def test_online_fisher_decays_the_old_one():
    old, new = {"a": torch.tensor([2.0, 4.0])}, {"a": torch.tensor([1.0, 0.0])}
    assert online_fisher(None, new, 0.5)["a"].tolist() == [1.0, 0.0]
    assert online_fisher(old, new, 0.5)["a"].tolist() == [2.0, 2.0]
    assert normalize_fisher({"a": torch.zeros(3)})["a"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(KeyError):
        online_fisher(old, {"b": torch.ones(2)}, 0.5)


# ---------------------------------------------------------------------------------------------------- fusion


def test_fusion_attention_by_hand():
    query = torch.tensor([1.0, 0.0])  # d = 2
    keys = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # scores 2/sqrt(2), 0
    values = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    fused, weights = fusion_attention(query, keys, values)
    w0 = torch.sigmoid(torch.tensor(2 / 2**0.5)).item()
    assert weights.tolist() == pytest.approx([w0, 1 - w0])
    assert fused.tolist() == pytest.approx([w0 * 1 + (1 - w0) * 3, w0 * 1 - (1 - w0)])
    single, one = fusion_attention(query, keys[:1], values[:1])
    assert one.tolist() == [1.0] and single.tolist() == values[0].tolist()
