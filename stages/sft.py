"""Supervised fine-tuning on TRL's SFTTrainer; produces (or continues) the `policy` adapter.

In a continual chain an SFT stage on a task's data is a *task stage*: it trains that task (plain sequential
fine-tuning), optionally with `replay` of earlier tasks' data, and is evaluated on the chain's tasks afterwards.
`stages/ewc.py` and `stages/adapter_fusion.py` reuse this class (its trainer class and data are hooks).
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from alignment.config import DataSource, ScheduleFields, StageConfig
from alignment.continual import TaskSpec, toy_task_name
from alignment.stage import StageContext, StageResult


class SFTConfig(ScheduleFields):  # + layer_lr_decay, unfreeze_every, unfreeze_unit (schedules.py)
    kind: Literal["sft"] = "sft"
    data: DataSource = "toy:sft"
    adapter_name: str = "policy"  # which named adapter this stage trains (continual chains use one per task)
    completion_only_loss: bool = True  # loss on completion tokens only (prompt/completion data)
    eval_steps: int | None = Field(None, ge=1)  # evaluate every N steps (default: at the end only)
    task: str | None = None  # continual: the task this stage trains (default for toy:task/<name> data: <name>)
    replay: float = Field(0.0, ge=0.0, le=1.0)  # continual: mix in this fraction of every earlier task's training rows

    def continual_tasks(self) -> list[TaskSpec] | None:
        if self.task is None and toy_task_name(self.data) is None:
            return None
        return [TaskSpec.from_stage(self.task, self.data, self.eval_data, self.columns)]

    def check_chain(self, index: int, earlier: list[StageConfig]) -> list[str]:
        if not self.replay:
            return []
        if self.continual_tasks() is None:
            return [
                f"stages.{index}.replay: replay mixes earlier tasks' data into a task stage, but this stage trains no "
                "task; set `task: <name>` (or use toy:task/<name> data)"
            ]
        if not any(s.continual_tasks() for s in earlier):
            return [f"stages.{index}.replay: no earlier stage trains a task to replay; drop `replay` on the first task"]
        return []


class SFTStage:
    """Supervised fine-tuning (TRL SFTTrainer): LoRA `policy` adapter by default, or full fine-tuning."""

    Config = SFTConfig

    def __init__(self, config: SFTConfig):
        self.config = config

    @classmethod
    def requires(cls, config: SFTConfig) -> set[str]:
        return set()

    @classmethod
    def produces(cls, config: SFTConfig) -> set[str]:
        return {config.adapter_name}

    def run(self, ctx: StageContext) -> StageResult:
        cfg = self.config
        rows, eval_rows, fmt, metrics = self.training_data(ctx)
        rows, eval_rows, fitted = self.fit_rows(ctx, rows, eval_rows, fmt)
        metrics.update(fitted)
        model = self._prepare_model(ctx)
        trainer = self.build_trainer(ctx, model, rows, eval_rows, fmt)
        from alignment.trainer_hooks import train

        train_loss = train(trainer, ctx)  # checkpoints, resume, NaN guard
        metrics = {"train_loss": round(train_loss, 4), "train_samples": len(rows), **metrics}
        if eval_rows:
            metrics["eval_loss"] = round(trainer.evaluate()["eval_loss"], 4)
        model.eval()

        artifact = self._save(ctx)
        result = StageResult(metrics=metrics, artifacts={cfg.adapter_name: ctx.relative(artifact)})
        if cfg.continual_tasks() is not None:
            result.info.update(ctx.task_accuracy())
        else:
            metrics.update(ctx.gold_metrics(model=model))
        self.method(ctx).release(ctx.policy, cfg.adapter_name)
        return result

    # ------------------------------------------------------------------------------------------------ hooks

    def trainer_class(self, ctx: StageContext):
        """The TRL trainer class; EWC returns a subclass that adds its penalty to the loss."""
        from trl import SFTTrainer

        return SFTTrainer

    def training_data(self, ctx: StageContext) -> tuple[list[dict], list[dict], str, dict]:
        """(train rows, eval rows, format, extra metrics). A task stage trains on its task (plus replay)."""
        from alignment.data import sft_rows

        cfg = self.config
        rng = random.Random(ctx.seed)
        if cfg.continual_tasks() is None:
            rows, fmt = sft_rows(cfg.data, cfg.columns, f"stages.{ctx.index}.data")
            rng.shuffle(rows)
            if cfg.max_samples:
                rows = rows[: cfg.max_samples]
            if cfg.eval_data:
                eval_rows, _ = sft_rows(cfg.eval_data, cfg.columns, f"stages.{ctx.index}.eval_data")
            else:
                n_eval = int(len(rows) * cfg.eval_fraction)
                eval_rows, rows = rows[:n_eval], rows[n_eval:]
            return rows, eval_rows, fmt, {}

        from alignment.continual import sft_rows as task_sft_rows

        task = self.task_data(ctx, cfg.continual_tasks()[0].name)
        rows = task_sft_rows(task.train)
        rng.shuffle(rows)
        if cfg.max_samples:
            rows = rows[: cfg.max_samples]
        replayed = 0
        if cfg.replay and ctx.chain is not None:
            for name in ctx.chain.earlier:
                earlier = task_sft_rows(ctx.chain.data(name).train)
                sample = rng.sample(earlier, round(len(earlier) * cfg.replay))
                rows += sample
                replayed += len(sample)
            rng.shuffle(rows)
        extra = {"replay_samples": replayed} if cfg.replay else {}
        return rows, task_sft_rows(task.eval), "prompt_completion", extra

    def fit_rows(self, ctx: StageContext, rows: list[dict], eval_rows: list[dict], fmt: str):
        """(train rows, eval rows, metrics) fitted to ``max_length`` (alignment/truncation.py): prompt/completion rows
        with each prompt cut from the left to fit with its completion and eos, chat rows with their oldest turns
        dropped, the rows whose answer cannot fit dropped and counted (``dropped_examples``); long plain-text rows are
        counted (the trainer keeps their start)."""
        from alignment.data import check_text_lengths
        from alignment.truncation import fit_completions, fit_messages

        cfg, tokenizer = self.config, ctx.policy.tokenizer
        fields = (f"stages.{ctx.index}.data", f"stages.{ctx.index}.{'eval_data' if cfg.eval_data else 'data'}")
        if fmt == "text":
            return rows, eval_rows, check_text_lengths(rows, tokenizer, cfg.max_length, cfg.long_prompts, fields[0])
        metrics, out = {}, []
        for split, field, data in (("", fields[0], rows), ("eval_", fields[1], eval_rows)):
            if data:
                report = (fit_messages(data, tokenizer, cfg.max_length, cfg.long_prompts, cfg.max_dropped_fraction,
                                       field) if fmt == "messages" else fit_completions(data, cfg, tokenizer, field))
                metrics.update(report.metrics("examples", split))
                data = report.rows
            out.append(data)
        return out[0], out[1], metrics

    @staticmethod
    def task_data(ctx: StageContext, name: str):
        """A task's examples: through the chain (cached, shared with the evaluator) or loaded directly."""
        from alignment.continual import load_task

        if ctx.chain is not None:
            return ctx.chain.data(name)
        spec = next(t for t in ctx.config.continual_tasks() if t.name == name)
        return load_task(spec, ctx.seed, f"stages.{ctx.index}.data")

    def build_trainer(self, ctx: StageContext, model, rows: list[dict], eval_rows: list[dict], fmt: str, **kwargs):
        from datasets import Dataset
        from trl import SFTConfig as TRLSFTConfig

        from alignment.schedules import trainer_schedule
        from alignment.training import trainer_callbacks, trl_args, use_console_progress

        cfg = self.config
        schedule_kwargs, schedule_callbacks = trainer_schedule(cfg, model)
        args = TRLSFTConfig(
            **trl_args(cfg, ctx),
            completion_only_loss=cfg.completion_only_loss if fmt == "prompt_completion" else None,
            eval_strategy="steps" if eval_rows and cfg.eval_steps else "no",
            eval_steps=cfg.eval_steps,
        )
        trainer = self.trainer_class(ctx)(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=ctx.policy.tokenizer,
            callbacks=trainer_callbacks(ctx.logger) + schedule_callbacks,
            **schedule_kwargs,
            **kwargs,
        )
        use_console_progress(trainer)
        return trainer

    def method(self, ctx: StageContext):
        from alignment.methods import method_for

        return method_for(ctx.adapter)

    def _prepare_model(self, ctx: StageContext):
        """The model TRL trains, made trainable by the configured method (alignment/methods.py); an adapter an
        earlier stage produced is continued."""
        cfg, method = self.config, self.method(ctx)
        if cfg.adapter_name in ctx.artifacts:
            return method.load(ctx.policy, cfg.adapter_name, ctx.artifacts[cfg.adapter_name], trainable=True)
        return method.prepare(ctx.policy, cfg.adapter_name)

    def _save(self, ctx: StageContext):
        cfg, method = self.config, self.method(ctx)
        folder = "model" if method.family == "base" else f"adapters/{cfg.adapter_name}"
        return method.save(ctx.policy, cfg.adapter_name, ctx.dir / folder)
