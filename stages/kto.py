"""KTO (Ethayarajh et al. 2024) on TRL's KTOTrainer, continuing the `policy` adapter against the frozen SFT policy.

KTO learns from unpaired thumbs-up / thumbs-down examples. Data: rows with `prompt`, `completion` and a boolean
`label` (true = desirable), or preference pairs (`prompt`/`chosen`/`rejected`, the default), which are split into one
desirable and one undesirable example each. The reference is made exactly as in DPO (stages/dpo.py): our `policy`
adapter is loaded as TRL's `default` and TRL copies it into the frozen `ref` adapter.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignment.config import DataSource, ScheduleFields
from alignment.stage import StageContext, StageResult
from stages.dpo import OfflinePolicy, preference_data, trl_reward_metrics


class KTOConfig(ScheduleFields):  # + layer_lr_decay, unfreeze_every, unfreeze_unit (schedules.py)
    kind: Literal["kto"] = "kto"
    data: DataSource | None = None  # default: the reward stage's preference data if there is one, else toy:preference
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)  # raise when desirable examples are rarer than undesirable ones
    undesirable_weight: float = Field(1.0, gt=0)
    learning_rate: float = Field(5e-4, gt=0)
    batch_size: int = Field(16, ge=2)  # KTO's KL reference point is estimated from mismatched pairs within a batch
    sft_weight: float = Field(0.0, ge=0.0)  # > 0 adds the NLL of the desirable completions (as DPO's RPO term)


class KTOStage:
    """KTO (TRL KTOTrainer) on unpaired desirable/undesirable examples, against the frozen SFT policy."""

    Config = KTOConfig

    def __init__(self, config: KTOConfig):
        self.config = config

    @classmethod
    def requires(cls, config: KTOConfig) -> set[str]:
        return {"policy"}

    @classmethod
    def produces(cls, config: KTOConfig) -> set[str]:
        return {"policy"}

    def run(self, ctx: StageContext) -> StageResult:
        from datasets import Dataset
        from trl import KTOConfig as TRLKTOConfig
        from trl import KTOTrainer

        from alignment.schedules import trainer_schedule
        from alignment.training import trainer_callbacks, trl_args, use_console_progress

        cfg, policy = self.config, ctx.policy
        rows, eval_rows, fit_metrics = self._examples(ctx)
        trained = OfflinePolicy(ctx, "KTO")
        sft_scores = ctx.gold_scores(trained.model)
        args = TRLKTOConfig(
            **trl_args(cfg, ctx),
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
            eval_strategy="no",
        )
        schedule_kwargs, schedule_callbacks = trainer_schedule(cfg, trained.model, switch=trained.separate)  # LLRD, unfreezing
        trainer = _trainer_class(KTOTrainer, cfg.sft_weight)(
            model=trained.model,
            ref_model=trained.ref_model,  # None: TRL copies `default` (our SFT policy) into the frozen `ref` adapter
            args=args,
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=policy.tokenizer,
            callbacks=trainer_callbacks(ctx.logger) + schedule_callbacks,
            **schedule_kwargs,
        )
        trained.copy_reference()
        use_console_progress(trainer)
        from alignment.trainer_hooks import train

        train_loss = train(trainer, ctx)  # checkpoints, resume, NaN guard
        trained.model.eval()

        desirable = sum(r["label"] for r in rows)
        metrics = {"train_loss": round(train_loss, 4), "train_desirable": desirable,
                   "train_undesirable": len(rows) - desirable, **fit_metrics}
        metrics.update(trl_reward_metrics(trainer, bool(eval_rows)))
        metrics["reference_max_abs_diff"] = trained.reference_drift()
        metrics.update(ctx.gold_metrics(baseline=sft_scores, model=trained.model))
        target = trained.save()
        return StageResult(metrics=metrics, artifacts={"policy": ctx.relative(target)})

    def _examples(self, ctx: StageContext) -> tuple[list[dict], list[dict], dict]:
        """Unpaired (prompt, completion, label) rows: as given, or two per preference pair; each prompt cut from the
        left to fit ``max_length`` with its completion (alignment/truncation.py). And the fitting's metrics."""
        from alignment.data import load_rows
        from alignment.errors import UserError

        cfg = self.config
        if cfg.data is not None:
            sample = load_rows(cfg.data, cfg.columns, f"stages.{ctx.index}.data")
            if {"prompt", "completion", "label"} <= set(sample[0]):
                rows, metrics = self._unpaired(sample, ctx, cfg.data, f"stages.{ctx.index}.data")
                eval_rows = []
                if cfg.eval_data:
                    field = f"stages.{ctx.index}.eval_data"
                    eval_rows, eval_metrics = self._unpaired(load_rows(cfg.eval_data, cfg.columns, field), ctx,
                                                             cfg.eval_data, field, "eval_")
                    metrics.update(eval_metrics)
                return rows, eval_rows, metrics
            if "label" in sample[0] or "completion" in sample[0]:
                raise UserError(f"stages.{ctx.index}.data: unpaired KTO data needs prompt, completion and label columns; "
                                f"columns found: {', '.join(sorted(sample[0]))}")
        rows, eval_rows, metrics = preference_data(cfg, ctx)
        return _unpair(rows), _unpair(eval_rows), metrics

    def _unpaired(self, rows: list[dict], ctx: StageContext, source: str, field: str,
                  split: str = "") -> tuple[list[dict], dict]:
        import random

        from alignment.data import row_location
        from alignment.errors import UserError
        from alignment.truncation import fit_completions

        out = []
        for i, r in enumerate(rows):
            label = r["label"]
            if isinstance(label, str) and label.lower() in ("true", "false", "1", "0", "yes", "no"):
                label = label.lower() in ("true", "1", "yes")
            if not isinstance(label, bool) and label not in (0, 1):
                raise UserError(f"{field}: {source!r} {row_location(source, i)}: label must be true/false (desirable "
                                f"or not), got {r['label']!r}")
            out.append({"prompt": str(r["prompt"]), "completion": str(r["completion"]), "label": bool(label)})
        fitted = fit_completions(out, self.config, ctx.policy.tokenizer, field)
        out = fitted.rows
        random.Random(ctx.seed).shuffle(out)
        return (out[: self.config.max_samples] if self.config.max_samples else out), fitted.metrics("examples", split)


def _unpair(pairs: list[dict]) -> list[dict]:
    """Each preference pair -> a desirable (chosen) and an undesirable (rejected) example."""
    out = []
    for r in pairs:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out


def _trainer_class(base, sft_weight: float):
    """TRL's KTOTrainer, plus ``sft_weight`` x the NLL of the desirable completions in the batch when asked.

    TRL's KTO has no such term; without it the toy policy drifts off-distribution as plain DPO does.
    """
    if not sft_weight:
        return base
    import torch

    class KTOWithNLL(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            desirable = torch.as_tensor(inputs["label"], dtype=torch.bool, device=inputs["input_ids"].device)
            if not desirable.any():
                return loss
            ids = inputs["input_ids"][desirable]
            labels = ids.masked_fill(inputs["completion_mask"][desirable] == 0, -100)
            nll = model(input_ids=ids, attention_mask=inputs["attention_mask"][desirable], labels=labels,
                        use_cache=False).loss
            if return_outputs:
                return loss[0] + sft_weight * nll, loss[1]
            return loss + sft_weight * nll

    return KTOWithNLL
