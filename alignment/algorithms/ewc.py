"""Elastic weight consolidation (Kirkpatrick et al., 2017): diagonal empirical Fisher and the quadratic penalty.

Parameters are dicts ``name -> tensor`` with stable names (for LoRA: peft's state-dict keys, without the adapter
name), so a penalty computed on one adapter name applies to the same adapter under another name.

    F_i      = 1/N sum_n (d loss_n / d theta_i)^2        (per-sample gradients of the task's own loss)
    penalty  = sum_i F_i (theta_i - theta*_i)^2           (the stage multiplies by lambda / 2)
    online:  F <- gamma F_old + F_new,  theta* <- theta after the newest task  (Schwarz et al., 2018)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

Params = Mapping[str, torch.Tensor]


def fisher_diagonal(
    parameters: Params, per_sample_losses: Iterable[Callable[[], torch.Tensor]], normalize: bool = True
) -> dict[str, torch.Tensor]:
    """Mean squared per-sample gradient of every parameter (the diagonal empirical Fisher).

    ``per_sample_losses`` yields one closure per example that runs the forward pass and returns that example's scalar
    loss; each is differentiated alone (a batch gradient would square the sum, not sum the squares). With
    ``normalize`` the result is divided by its mean over all entries, so ``lambda`` reads as the weight of an
    importance-weighted L2 pull and does not depend on the loss scale or the number of parameters.
    """
    names = list(parameters)
    tensors = [parameters[n] for n in names]
    sums = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    count = 0
    for loss_fn in per_sample_losses:
        grads = torch.autograd.grad(loss_fn(), tensors, allow_unused=True)
        for total, grad in zip(sums, grads):
            if grad is not None:
                total += grad.detach().float() ** 2
        count += 1
    if count == 0:
        raise ValueError("the Fisher needs at least one example")
    fisher = {n: s / count for n, s in zip(names, sums)}
    return normalize_fisher(fisher) if normalize else fisher


def normalize_fisher(fisher: Params) -> dict[str, torch.Tensor]:
    """Divide by the mean entry (all tensors together); an all-zero Fisher stays zero."""
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = total / max(count, 1)
    return {n: (f / mean if mean > 0 else f.clone()) for n, f in fisher.items()}


def ewc_penalty(parameters: Params, fisher: Params, anchor: Params) -> torch.Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 over the parameters the Fisher covers (a scalar, differentiable)."""
    missing = [n for n in fisher if n not in parameters]
    if missing:
        raise KeyError(f"the EWC penalty covers parameters the model does not have, e.g. {missing[0]!r}")
    terms = [(fisher[n].to(parameters[n]) * (parameters[n] - anchor[n].to(parameters[n])) ** 2).sum() for n in fisher]
    if terms:
        return torch.stack(terms).sum()
    like = next(iter(parameters.values()), None)  # no terms: a zero on the parameters' device, not the CPU's
    return like.new_zeros(()) if like is not None else torch.zeros(())


def online_fisher(previous: Params | None, new: Params, gamma: float) -> dict[str, torch.Tensor]:
    """The running Fisher of online EWC: gamma * previous + new (just ``new`` for the first task)."""
    if previous is None:
        return {n: f.clone() for n, f in new.items()}
    if set(previous) != set(new):
        raise KeyError("online EWC needs the same parameters for every task; the adapter changed shape or name")
    return {n: gamma * previous[n] + new[n] for n in new}
