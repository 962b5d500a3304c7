"""The stage contract: what a stage declares, what it is given (``StageContext``) and returns (``StageResult``).

A stage is any class with:

    Config: type[StageConfig]                      # pydantic, extra="forbid", narrows `kind`
    @classmethod requires(cls, config) -> set[str]  # artifact names it needs ("policy", "reward_model", ...)
    @classmethod produces(cls, config) -> set[str]  # artifact names it adds
    def __init__(self, config): ...
    def run(self, ctx: StageContext) -> StageResult

Artifacts are named folders inside the run folder; ``ctx.artifacts`` maps each name to the latest producer's path.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from alignment.config import MethodOptions, PipelineConfig, RolloutConfig, StageConfig
from alignment.errors import UserError

if TYPE_CHECKING:
    from alignment.continual import Chain
    from alignment.metrics import MetricsLogger
    from alignment.policy import SharedPolicy


class Stage(Protocol):
    Config: type[StageConfig]

    @classmethod
    def requires(cls, config: StageConfig) -> set[str]: ...

    @classmethod
    def produces(cls, config: StageConfig) -> set[str]: ...

    def run(self, ctx: StageContext) -> StageResult: ...


@dataclasses.dataclass
class StageResult:
    metrics: dict[str, Any]
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> path relative to the run folder
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra keys for the summary entry


@dataclasses.dataclass
class StageContext:
    index: int
    config: StageConfig
    pipeline: PipelineConfig
    run_dir: Path
    dir: Path  # this stage's folder
    artifacts: dict[str, Path]  # artifact name -> absolute path
    logger: MetricsLogger
    _policy_loader: Any  # callable returning the shared SharedPolicy (loaded on first use)
    chain: Chain | None = None  # continual chains: the tasks and how to evaluate them (None outside a chain)
    resume: Path | None = None  # the complete checkpoint an interrupted run of this stage left (alignment/checkpoint.py)

    @property
    def label(self) -> str:
        """How errors name this stage: ``stages.<index> (<kind>)``."""
        return f"stages.{self.index} ({self.config.kind})"

    @property
    def seed(self) -> int:
        return self.pipeline.seed

    @property
    def adapter(self) -> MethodOptions:
        return self.pipeline.adapter_for(self.config)

    @property
    def rollout(self) -> RolloutConfig:
        return self.pipeline.rollout_for(self.config)

    @property
    def policy(self) -> SharedPolicy:
        return self._policy_loader()

    @property
    def is_toy(self) -> bool:
        """The toy gold evaluator judges this run (a toy model, or toy data with any model)."""
        return self.pipeline.judged_by_toy

    def artifact(self, name: str) -> Path:
        if name not in self.artifacts:
            raise UserError(f"stages.{self.index}: needs the `{name}` artifact, which no earlier stage produced")
        return self.artifacts[name]

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.run_dir.resolve()))

    def seed_everything(self, offset: int = 0) -> None:
        import numpy as np
        import torch

        seed = self.pipeline.seed + offset
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def gold_metrics(self, baseline: list[float] | None = None, model=None) -> dict[str, float]:
        """Toy only: the shared gold evaluator on ``model`` (default: the policy as it is now, active adapter).
        {} otherwise.

        With ``baseline`` (per-prompt scores from ``gold_scores``) it adds ``gold_win_rate`` against it.
        """
        if not self.is_toy:
            return {}
        from alignment.evaluation import gold_eval

        return gold_eval(self.policy.model if model is None else model, self.policy.tokenizer, self.pipeline.toy_world,
                         baseline=baseline)

    def task_accuracy(self, model=None) -> dict[str, Any]:
        """Continual chains: ``{"task_accuracy": {task: accuracy}}`` of ``model`` (default: the policy as it is now)
        on the chain's evaluated tasks, for the stage's ``StageResult.info``; {} outside a chain."""
        if self.chain is None:
            return {}
        from alignment.metrics import console

        with console.status(f"evaluating tasks {', '.join(self.chain.evaluated())}"):
            accuracy = self.chain.evaluate(model if model is not None else self.policy.model, self.policy.tokenizer)
        console.print("  task accuracy: " + "  ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
        return {"task_accuracy": accuracy}

    def gold_scores(self, model=None) -> list[float] | None:
        """Toy only: per-prompt gold scores of ``model`` (default: the policy as it is now) for win rates. None
        otherwise."""
        if not self.is_toy:
            return None
        from alignment.evaluation import gold_scores

        return gold_scores(self.policy.model if model is None else model, self.policy.tokenizer, self.pipeline.toy_world)
