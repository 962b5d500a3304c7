"""Supervised fine-tuning on TRL's SFTTrainer; produces (or continues) the `policy` adapter."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from alignment.config import DataSource, StageConfig
from alignment.stage import StageContext, StageResult


class SFTConfig(StageConfig):
    kind: Literal["sft"] = "sft"
    data: DataSource = "toy:sft"
    eval_data: DataSource | None = None  # held-out rows; without it `eval_fraction` of `data` is held out
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    columns: dict[str, str] = Field(default_factory=dict)  # our name -> your column, e.g. {prompt: question}
    max_samples: int | None = Field(None, ge=1)
    adapter_name: str = "policy"  # which named adapter this stage trains (continual chains use one per task)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(256, ge=8)
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
        import torch
        from datasets import Dataset
        from trl import SFTConfig as TRLSFTConfig
        from trl import SFTTrainer

        from alignment.data import sft_rows
        from alignment.trainer_logging import trainer_callbacks, use_console_progress

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
            output_dir=str(ctx.dir / "checkpoints"),
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_ratio,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            max_length=cfg.max_length,
            completion_only_loss=cfg.completion_only_loss if fmt == "prompt_completion" else None,
            logging_steps=ctx.pipeline.logging.log_every,
            eval_strategy="steps" if eval_rows and cfg.eval_steps else "no",
            eval_steps=cfg.eval_steps,
            save_strategy="no",
            report_to="none",
            seed=ctx.seed,
            data_seed=ctx.seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=ctx.policy.base.dtype == torch.bfloat16,
            fp16=ctx.policy.base.dtype == torch.float16,
            dataset_num_proc=None,
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
