"""Reward models: anything with ``score(prompts, completions) -> tensor[B]``.

Kinds (``build_reward_model`` takes a spec mapping with ``kind``):
- ``trained``: a score head + `reward` LoRA adapter on the shared base (or on its own base), from the reward
  stage's artifact or any folder a user points at;
- ``rule``: a plain Python function ``module:function`` taking (prompt, completion) and returning a float;
- ``toy_gold``: the toy world's hidden gold scorer (for experiments);
- ``composite``: a weighted sum of others, each normalised.
Wrap any of them in ``Normalized`` for running or fixed mean/std normalisation and clipping.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class RewardModel(Protocol):
    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor: ...


from reward_models.simple import Composite, Normalized, RuleReward, ToyGoldReward  # noqa: E402
from reward_models.trained import TrainedRewardModel  # noqa: E402

__all__ = ["RewardModel", "TrainedRewardModel", "RuleReward", "ToyGoldReward", "Composite", "Normalized"]
