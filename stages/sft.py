"""Supervised fine-tuning on TRL's SFTTrainer; produces (or continues) the `policy` adapter."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from alignment.config import DataSource, TrainingConfig
from alignment.stage import StageContext, StageResult


class SFTConfig(TrainingConfig):
    kind: Literal["sft"] = "sft"
    data: DataSource = "toy:sft"
    adapter_name: str = "policy"  # which named adapter this stage trains (continual chains use one per task)
    completion_only_loss: bool = True  # loss on completion tokens only (prompt/completion data)
    eval_steps: int | None = Field(None, ge=1)  # evaluate every N steps (default: at the end only)


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
        from datasets import Dataset
        from trl import SFTConfig as TRLSFTConfig
        from trl import SFTTrainer

        from alignment.data import sft_rows
        from alignment.training import trainer_callbacks, trl_args, use_console_progress

        cfg = self.config
        rows, fmt = sft_rows(cfg.data, cfg.columns, f"stages.{ctx.index}.data")
        random.Random(ctx.seed).shuffle(rows)
        if cfg.max_samples:
            rows = rows[: cfg.max_samples]
        if cfg.eval_data:
            eval_rows, _ = sft_rows(cfg.eval_data, cfg.columns, f"stages.{ctx.index}.eval_data")
        else:
            n_eval = int(len(rows) * cfg.eval_fraction)
            eval_rows, rows = rows[:n_eval], rows[n_eval:]

        policy = ctx.policy
        model = self._prepare_model(ctx)
        args = TRLSFTConfig(
            **trl_args(cfg, ctx),
            completion_only_loss=cfg.completion_only_loss if fmt == "prompt_completion" else None,
            eval_strategy="steps" if eval_rows and cfg.eval_steps else "no",
            eval_steps=cfg.eval_steps,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=policy.tokenizer,
            callbacks=trainer_callbacks(ctx.logger),
        )
        use_console_progress(trainer)
        output = trainer.train()
        metrics = {"train_loss": round(output.training_loss, 4), "train_samples": len(rows)}
        if eval_rows:
            metrics["eval_loss"] = round(trainer.evaluate()["eval_loss"], 4)
        model.eval()

        artifact = self._save(ctx)
        metrics.update(ctx.gold_metrics())
        return StageResult(metrics=metrics, artifacts={cfg.adapter_name: ctx.relative(artifact)})

    def _prepare_model(self, ctx: StageContext):
        """The model TRL trains: the shared PeftModel with our adapter active, or the bare base for `full`."""
        from alignment.errors import UserError

        cfg, policy = self.config, ctx.policy
        if ctx.adapter.method == "full":
            if policy.adapters:
                raise UserError(
                    f"stages.{ctx.index}.adapter.method: full fine-tuning needs a base without adapters; "
                    "put the full-fine-tuning stage first or use `lora`"
                )
            if cfg.adapter_name in ctx.artifacts:
                raise UserError(f"stages.{ctx.index}: continuing a full fine-tune in the same run is not supported yet")
            for p in policy.base.parameters():
                p.requires_grad_(True)
            return policy.base
        if cfg.adapter_name in ctx.artifacts:  # continue the adapter an earlier stage produced
            policy.load_adapter(cfg.adapter_name, ctx.artifacts[cfg.adapter_name], trainable=True)
        else:
            policy.add_adapter(cfg.adapter_name, ctx.adapter)
        return policy.model

    def _save(self, ctx: StageContext):
        cfg, policy = self.config, ctx.policy
        if ctx.adapter.method == "full":
            target = ctx.dir / "model"
            policy.base.save_pretrained(target, safe_serialization=True)
            policy.tokenizer.save_pretrained(target)
            return target
        target = ctx.dir / "adapters" / cfg.adapter_name
        policy.save_adapter(cfg.adapter_name, target)
        return target
