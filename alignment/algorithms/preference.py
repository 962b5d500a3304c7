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


def pairwise_outcomes(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                      chosen_is_better: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) credit per pair: 1 when the model orders it as the label does, 0 when it orders it the other way, 0.5 for a
    tie (equal rewards: the model cannot tell the answers apart, which is a coin, not an error).

    chosen_rewards, rejected_rewards: (B,). chosen_is_better: (B,) bool labels (the noiseless truth where the data has
    one); None: the chosen answer is the better one.
    """
    higher = chosen_rewards > rejected_rewards
    if chosen_is_better is not None:
        higher = higher == chosen_is_better.to(higher.device)
    return torch.where(chosen_rewards == rejected_rewards, 0.5, higher.float())


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                      chosen_is_better: torch.Tensor | None = None) -> float:
    """Mean of ``pairwise_outcomes``: the fraction of pairs (B,) ordered right, ties counting half."""
    return pairwise_outcomes(chosen_rewards, rejected_rewards, chosen_is_better).mean().item()


def tie_rate(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Fraction of pairs (B,) whose two rewards are equal."""
    return (chosen_rewards == rejected_rewards).float().mean().item()
