"""RLOO: REINFORCE with a leave-one-out baseline over G completions per prompt (Ahmadian et al. 2024).

The loop is GRPO's (stages/grpo.py): same rollouts, reward, frozen SFT reference with KL (k3) in the loss, clipped
surrogate, no critic. Only the advantage differs: each completion's score minus the mean of its G - 1 siblings.
"""

from __future__ import annotations

from typing import Literal

from stages.grpo import GroupConfig, GRPOStage


class RLOOConfig(GroupConfig):
    kind: Literal["rloo"] = "rloo"


class RLOOStage(GRPOStage):
    """RLOO: leave-one-out baseline over the group, clipped surrogate, KL to the frozen SFT policy, no critic."""

    Config = RLOOConfig

    def advantages(self, scores):
        from alignment.algorithms.group import rloo_advantages

        return rloo_advantages(scores, self.config.group_size)
