"""Preference-model maths."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin).

    chosen_rewards, rejected_rewards: (B,) scalar rewards of the preferred and dispreferred answers.
    margin: scalar or (B,): how much better the chosen answer must score (Llama 2's margin loss); 0 is plain BT.
    It is moved to the rewards' device and dtype (a margin built on the CPU meets rewards on the model's device).
    Returns a scalar.
    """
    margin = torch.as_tensor(margin, dtype=chosen_rewards.dtype, device=chosen_rewards.device)
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Fraction of pairs (B,) where the chosen answer scores strictly higher."""
    return (chosen_rewards > rejected_rewards).float().mean().item()
