"""User-plugin stages for tests: the same contract as built-ins, no model needed."""

from __future__ import annotations

from typing import Literal

from alignment.config import StageConfig
from alignment.stage import StageContext, StageResult
from alignment.io import atomic_write_text

CALLS: list[str] = []  # names of stages that actually ran in this process


class EchoConfig(StageConfig):
    kind: Literal["tests.plugins.echo:EchoStage"] = "tests.plugins.echo:EchoStage"
    value: float = 1.0
    label: str = "echo"


class EchoStage:
    """Writes a note artifact and reports `value` as a metric."""

    Config = EchoConfig

    def __init__(self, config):
        self.config = config

    @classmethod
    def requires(cls, config):
        return set()

    @classmethod
    def produces(cls, config):
        return {"note"}

    def run(self, ctx: StageContext) -> StageResult:
        CALLS.append(self.config.label)
        ctx.logger.log(1, {"value": self.config.value}, echo=False)
        atomic_write_text(ctx.dir / "note.txt", self.config.label)
        return StageResult({"value": self.config.value}, {"note": ctx.relative(ctx.dir / "note.txt")})


class NeedsPolicyConfig(StageConfig):
    kind: Literal["tests.plugins.echo:NeedsPolicyStage"] = "tests.plugins.echo:NeedsPolicyStage"
    other: int = 3


class NeedsPolicyStage(EchoStage):
    """Needs a `policy` artifact (for artifact-chain checks)."""

    Config = NeedsPolicyConfig

    @classmethod
    def requires(cls, config):
        return {"policy"}
