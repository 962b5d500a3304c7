"""Continual-learning metrics over an accuracy matrix, and per-task loss weights for joint training (pure Python).

``acc[i][j]`` is the accuracy on task ``j`` after chain row ``i`` (a stage that trained a task, or composed earlier
ones), ``None`` where it was not evaluated. ``trained_at[j]`` is the row right after task ``j`` was trained: in a
plain chain ``trained_at[j] == j``; in a fusion chain the fused model is one more row after the last task. The
definitions follow Lopez-Paz & Ranzato (2017, GEM) and Chaudhry et al. (2018, forgetting), with F the last row:

    avg_acc    = mean_j acc[F][j]
    bwt        = mean_{j: trained_at[j] < F} (acc[F][j] - acc[trained_at[j]][j])
    forgetting = mean_{j: trained_at[j] < F} (max_{trained_at[j] <= l < F} acc[l][j] - acc[F][j])
    fwt        = mean_{j: trained_at[j] > 0} (acc[trained_at[j] - 1][j] - baseline[j])

A quantity with no term (one row, or tasks never evaluated before training) is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def average_accuracy(acc: Matrix) -> float | None:
    """Mean accuracy of the final row over every task it was evaluated on."""
    return _mean([a for a in acc[-1] if a is not None])


def backward_transfer(acc: Matrix, trained_at: Sequence[int]) -> float | None:
    """Mean change on each earlier task between right after its training and the end (negative = forgetting)."""
    final = len(acc) - 1
    terms = [
        acc[final][j] - acc[row][j]
        for j, row in enumerate(trained_at)
        if row < final and acc[final][j] is not None and acc[row][j] is not None
    ]
    return _mean(terms)


def forgetting(acc: Matrix, trained_at: Sequence[int]) -> float | None:
    """Mean drop from each earlier task's best accuracy (from its training on, before the end) to the end."""
    final = len(acc) - 1
    terms = []
    for j, row in enumerate(trained_at):
        history = [acc[l][j] for l in range(row, final) if acc[l][j] is not None]
        if row < final and history and acc[final][j] is not None:
            terms.append(max(history) - acc[final][j])
    return _mean(terms)


def forward_transfer(acc: Matrix, trained_at: Sequence[int], baseline: Sequence[float | None] | None) -> float | None:
    """Mean accuracy on each task just before its training, minus the untrained model's accuracy on it."""
    if baseline is None:
        return None
    terms = [
        acc[row - 1][j] - baseline[j]
        for j, row in enumerate(trained_at)
        if row > 0 and acc[row - 1][j] is not None and baseline[j] is not None
    ]
    return _mean(terms)


def continual_metrics(
    acc: Matrix, trained_at: Sequence[int], baseline: Sequence[float | None] | None = None, digits: int = 4
) -> dict[str, float | None]:
    """avg_acc, bwt, fwt, forgetting of an accuracy matrix (each rounded to ``digits``, None where undefined)."""
    if not acc or len(trained_at) != len(acc[0]):
        raise ValueError("acc needs at least one row, and one trained_at entry per task (column)")
    if any(not 0 <= row < len(acc) for row in trained_at):
        raise ValueError(f"trained_at rows must lie in 0..{len(acc) - 1}, got {list(trained_at)}")
    values = {
        "avg_acc": average_accuracy(acc),
        "bwt": backward_transfer(acc, trained_at),
        "fwt": forward_transfer(acc, trained_at, baseline),
        "forgetting": forgetting(acc, trained_at),
    }
    return {k: None if v is None else round(v, digits) for k, v in values.items()}


# ------------------------------------------------------------------------------------- joint-training weights


def static_weights(weights: Sequence[float] | None, n_tasks: int) -> list[float]:
    """Fixed per-task loss weights alpha, rescaled to sum to the number of tasks (all 1 when none are given)."""
    if weights is None:
        return [1.0] * n_tasks
    if len(weights) != n_tasks or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need {n_tasks} non-negative weights with a positive sum, got {list(weights)}")
    total = sum(weights)
    return [n_tasks * w / total for w in weights]


def dynamic_weight_average(
    previous: Sequence[float] | None, before_previous: Sequence[float] | None, temperature: float = 2.0
) -> list[float] | None:
    """Dynamic Weight Average (Liu et al., 2019): alpha_k(t) = K softmax_k(r_k / T), r_k = L_k(t-1) / L_k(t-2).

    ``previous`` and ``before_previous`` are each task's mean loss over the last two windows. A task whose loss falls
    more slowly gets more weight. Returns None until two windows exist (the caller then uses equal weights).
    """
    if previous is None or before_previous is None:
        return None
    if len(previous) != len(before_previous) or temperature <= 0:
        raise ValueError("previous and before_previous need one loss per task, and temperature must be > 0")
    ratios = [p / max(b, 1e-12) for p, b in zip(previous, before_previous)]
    top = max(r / temperature for r in ratios)
    exps = [math.exp(r / temperature - top) for r in ratios]
    return [len(ratios) * e / sum(exps) for e in exps]
