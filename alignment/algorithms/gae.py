"""Generalised advantage estimation over response tokens."""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, right to left.

    rewards, values, mask: (B, T); mask is 1 on real response tokens (a prefix of each row), 0 on padding.
    delta_t = r_t + gamma * V_{t+1} * mask_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1} * mask_{t+1}.
    Returns (advantages, returns), both (B, T), zero where mask is 0; returns = advantages + values.
    """
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        last = delta + gamma * lam * last * next_mask
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask
