"""ORPO (Hong et al. 2024) on TRL's ORPOTrainer (``trl.experimental.orpo`` in TRL 1.16), continuing `policy`.

ORPO needs no reference model: its loss is the NLL of the chosen answer plus ``beta`` times a log odds-ratio term
that pushes the chosen answer's odds above the rejected one's. It can therefore start from the SFT adapter (as here)
or from a bare base. Data as for DPO: prompt/chosen/rejected, by default the reward stage's preference data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignment.config import DataSource, ScheduleFields
from alignment.stage import StageContext, StageResult
from stages.dpo import OfflinePolicy, preference_data, trl_reward_metrics


class ORPOConfig(ScheduleFields):  # + layer_lr_decay, unfreeze_every, unfreeze_unit (schedules.py)
    kind: Literal["orpo"] = "orpo"
    data: DataSource | None = None  # default: the reward stage's preference data if there is one, else toy:preference
    beta: float = Field(0.1, gt=0)  # weight of the odds-ratio term (TRL's ORPO `beta`, the paper's lambda)
    learning_rate: float = Field(5e-4, gt=0)


class ORPOStage:
    """ORPO (TRL ORPOTrainer): NLL on the chosen answer + odds-ratio preference term; no reference model."""

    Config = ORPOConfig

    def __init__(self, config: ORPOConfig):
        self.config = config

    @classmethod
    def requires(cls, config: ORPOConfig) -> set[str]:
        return {"policy"}

    @classmethod
    def produces(cls, config: ORPOConfig) -> set[str]:
        return {"policy"}

    def run(self, ctx: StageContext) -> StageResult:
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we pin TRL; the experimental warning is not news
        from datasets import Dataset
        from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
        from trl.experimental.orpo import ORPOTrainer

        from alignment.schedules import trainer_schedule
        from alignment.training import trainer_callbacks, trl_args, use_console_progress

        cfg, policy = self.config, ctx.policy
        rows, eval_rows, fit_metrics = preference_data(cfg, ctx)
        trained = OfflinePolicy(ctx, "ORPO", reference=False)
        sft_scores = ctx.gold_scores(trained.model)
        args = TRLORPOConfig(**trl_args(cfg, ctx), beta=cfg.beta, eval_strategy="no")
        schedule_kwargs, schedule_callbacks = trainer_schedule(cfg, trained.model, switch=trained.separate)  # LLRD, unfreezing
        trainer = real_token_trainer(ORPOTrainer)(
            model=trained.model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=policy.tokenizer,
            callbacks=trainer_callbacks(ctx.logger) + schedule_callbacks,
            **schedule_kwargs,
        )
        use_console_progress(trainer)
        from alignment.trainer_hooks import train

        train_loss = train(trainer, ctx)  # checkpoints, resume, NaN guard
        trained.model.eval()

        metrics = {"train_loss": round(train_loss, 4), "train_pairs": len(rows), **fit_metrics}
        metrics.update(trl_reward_metrics(trainer, bool(eval_rows)))
        metrics.update(ctx.gold_metrics(baseline=sft_scores, model=trained.model))
        target = trained.save()
        return StageResult(metrics=metrics, artifacts={"policy": ctx.relative(target)})


def real_token_trainer(trainer_class):
    """``trainer_class`` (TRL's ORPOTrainer) reading the real tokens' logits. peft's prompt tuning and P-tuning
    prepend their virtual tokens to the logits the model returns; TRL's DPO and KTO trainers keep the last
    ``seq_len`` positions, its ORPO trainer compares all of them with the labels (measured: "Expected input
    batch_size (132) to match target batch_size (116)"). A forward hook on the model, for the one forward of each
    ORPO step (``concatenated_forward``), drops them (``real_token_logits``: every other method returns one position
    per input token and is left as it is)."""
    from alignment.policy import real_token_logits

    def keep_real_tokens(module, args, kwargs, output):
        input_ids = args[0] if args else kwargs["input_ids"]
        output.logits = real_token_logits(output.logits, input_ids)
        return output

    class RealTokenTrainer(trainer_class):
        def concatenated_forward(self, model, batch):
            hook = model.register_forward_hook(keep_real_tokens, with_kwargs=True)
            try:
                return super().concatenated_forward(model, batch)
            finally:
                hook.remove()

    return RealTokenTrainer
