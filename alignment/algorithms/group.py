"""Critic-free advantages from groups of completions of the same prompt (GRPO, RLOO).

Scores arrive flat, grouped by prompt: ``scores`` (N * G,) holds prompt 0's G completions, then prompt 1's, ...
Each function returns one advantage per completion, (N * G,); the loss broadcasts it over that completion's tokens.
"""

from __future__ import annotations

import torch


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"group-relative advantages need at least 2 completions per prompt, got {group_size}")
    if scores.ndim != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be flat with a multiple of {group_size} entries, got shape {tuple(scores.shape)}")
    return scores.float().view(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i - mean(group)) / (std(group) + eps), or without the division
    (``scale=False``, as Dr. GRPO recommends: dividing by std up-weights prompts whose answers barely differ).

    std is the unbiased sample standard deviation. A group whose completions all score the same gets 0.
    """
    groups = _grouped(scores, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean of the *other* G - 1 scores of the same prompt.

    Equivalently G / (G - 1) * (r_i - mean(group)): an unbiased baseline that does not include the sample itself.
    """
    groups = _grouped(scores, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)
