"""Reward models that need no training: rules, the toy gold scorer, weighted composites, normalisation."""

from __future__ import annotations

import importlib

import torch

from alignment.errors import UserError


class RuleReward:
    """A plain function ``module:function`` with signature (prompt, completion) -> float."""

    def __init__(self, target: str, field: str = "reward"):
        """``field``: the config path errors name, as the user wrote it (``stages.2.reward``)."""
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise UserError(f"{field}: {target!r} must look like package.module:function (or `trained` / `toy_gold`)")
        try:
            self.fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"{field}: cannot load {target!r} ({e}); check the module is importable from where you "
                            "run (PYTHONPATH) and the function name") from None

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return torch.tensor([float(self.fn(p, c)) for p, c in zip(prompts, completions)])


class ToyGoldReward:
    """The toy world's hidden gold scorer (reward in [0, 1])."""

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        from alignment.toy.world import gold_score

        return torch.tensor([gold_score(p, c).reward for p, c in zip(prompts, completions)])


class Normalized:
    """Normalise another reward model: fixed (mean, std) or running statistics; then clip to ±``clip``."""

    def __init__(self, inner, mean: float | None = None, std: float | None = None, clip: float | None = None):
        self.inner, self.clip = inner, clip
        self.fixed = mean is not None and std is not None
        self.mean, self.var, self.count = (mean or 0.0), (std or 1.0) ** 2, 0

    def update(self, rewards: torch.Tensor) -> None:
        """Welford-style merge of a batch into the running mean/variance."""
        n = rewards.numel()
        if self.fixed or n == 0:
            return
        batch_mean, batch_var = rewards.mean().item(), rewards.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Update the running statistics with ``raw`` (unless fixed), then standardise and clip it."""
        self.update(raw)
        out = (raw - self.mean) / (self.var**0.5 + 1e-8)
        return out.clamp(-self.clip, self.clip) if self.clip else out

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return self.normalize(self.inner.score(prompts, completions))


class Composite:
    """Weighted sum of reward models, each normalised first (running statistics unless given fixed ones)."""

    def __init__(self, parts: list[tuple[float, object]], normalize: bool = True):
        self.parts = [(w, Normalized(m) if normalize and not isinstance(m, Normalized) else m) for w, m in parts]

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return sum(w * m.score(prompts, completions) for w, m in self.parts)
