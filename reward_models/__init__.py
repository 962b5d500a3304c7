"""Reward models: anything with ``score(prompts, completions) -> tensor[B]``."""

from __future__ import annotations

from typing import Protocol

import torch


class RewardModel(Protocol):
    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor: ...
