"""Direct preference optimisation on TRL's DPOTrainer, continuing the `policy` adapter.

The reference is the frozen SFT policy (not the bare base): TRL 1.16, given a PeftModel, copies the adapter named
`default` into a frozen `ref` adapter on the same base. So at this boundary our `policy` adapter is loaded as
`default`, TRL makes `ref` from it, and after training `default` is saved back as the `policy` artifact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignment.config import DataSource, ScheduleFields
from alignment.stage import StageContext, StageResult

TRL_TRAINED, TRL_REFERENCE = "default", "ref"  # adapter names hard-coded in TRL's dpo_trainer.py


class DPOConfig(ScheduleFields):  # + layer_lr_decay, unfreeze_every, unfreeze_unit (schedules.py)
    kind: Literal["dpo"] = "dpo"
    data: DataSource | None = None  # default: the reward stage's preference data if there is one, else toy:preference
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    sft_weight: float = Field(0.0, ge=0.0)  # > 0 adds an NLL term on the chosen answers (RPO) against likelihood drift
    learning_rate: float = Field(5e-4, gt=0)


class DPOStage:
    """Direct preference optimisation (TRL DPOTrainer) of the `policy` adapter against the frozen SFT policy."""

    Config = DPOConfig

    def __init__(self, config: DPOConfig):
        self.config = config

    @classmethod
    def requires(cls, config: DPOConfig) -> set[str]:
        return {"policy"}

    @classmethod
    def produces(cls, config: DPOConfig) -> set[str]:
        return {"policy"}

    def run(self, ctx: StageContext) -> StageResult:
        from datasets import Dataset
        from trl import DPOConfig as TRLDPOConfig
        from trl import DPOTrainer

        from alignment.schedules import trainer_schedule
        from alignment.training import trainer_callbacks, trl_args, use_console_progress

        cfg, policy = self.config, ctx.policy
        rows, eval_rows, fit_metrics = preference_data(cfg, ctx)
        trained = OfflinePolicy(ctx, "DPO")
        sft_scores = ctx.gold_scores(trained.model)

        args = TRLDPOConfig(
            **trl_args(cfg, ctx),
            beta=cfg.beta,
            loss_type=[cfg.loss_type, "sft"] if cfg.sft_weight else [cfg.loss_type],
            loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight else None,
            label_smoothing=cfg.label_smoothing,
            eval_strategy="no",
        )
        schedule_kwargs, schedule_callbacks = trainer_schedule(cfg, trained.model, switch=trained.separate)  # LLRD, unfreezing
        trainer = DPOTrainer(
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
        record_reference(ctx, rows[:4], trained.ref_model)
        from alignment.trainer_hooks import train

        train_loss = train(trainer, ctx)  # checkpoints, resume, NaN guard
        trained.model.eval()

        metrics = {"train_loss": round(train_loss, 4), "train_pairs": len(rows), **fit_metrics}
        metrics.update(trl_reward_metrics(trainer, bool(eval_rows)))
        metrics["reference_max_abs_diff"] = trained.reference_drift()
        metrics.update(ctx.gold_metrics(baseline=sft_scores, model=trained.model))
        target = trained.save()
        return StageResult(metrics=metrics, artifacts={"policy": ctx.relative(target)})


# ----------------------------------------------------------- shared with the other offline objectives (KTO, ORPO)


def preference_data(cfg, ctx: StageContext) -> tuple[list[dict], list[dict], dict]:
    """(train rows, eval rows, metrics: ``dropped_pairs`` per reason, ...) with prompt/chosen/rejected, each prompt cut
    from the left to fit ``max_length`` with both answers and eos (alignment/truncation.py: TRL's trainers then cut
    nothing). Without ``cfg.data``: the reward stage's preference data when the run has one, else toy:preference."""
    from alignment.data import preference_rows
    from alignment.io import read_json
    from alignment.truncation import fit_pairs

    policy = ctx.policy
    source = cfg.data
    if source is None:
        source = read_json(ctx.artifacts["preference_data"])["source"] if "preference_data" in ctx.artifacts else "toy:preference"
    field = f"stages.{ctx.index}.data"
    rows, identical = preference_rows(source, cfg.columns, field, policy.tokenizer)
    fitted = fit_pairs(rows, cfg, policy.tokenizer, field, already_identical=identical)
    rows, metrics = fitted.rows, fitted.metrics()
    random.Random(ctx.seed).shuffle(rows)
    if cfg.max_samples:
        rows = rows[: cfg.max_samples]
    if cfg.eval_data:
        field = f"stages.{ctx.index}.eval_data"
        eval_rows, identical = preference_rows(cfg.eval_data, cfg.columns, field, policy.tokenizer)
        eval_fitted = fit_pairs(eval_rows, cfg, policy.tokenizer, field, already_identical=identical)
        eval_rows = eval_fitted.rows
        metrics.update(eval_fitted.metrics(split="eval_"))
    else:
        n_eval = int(len(rows) * cfg.eval_fraction)
        eval_rows, rows = rows[:n_eval], rows[n_eval:]
    keep = ("prompt", "chosen", "rejected")
    return [{k: r[k] for k in keep} for r in rows], [{k: r[k] for k in keep} for r in eval_rows], metrics


class OfflinePolicy:
    """The model an offline preference stage (DPO, KTO, ORPO) trains, and its frozen reference (``ref_model``).

    peft adapters (the LoRA family, IA3): the `policy` adapter is loaded as TRL's `default` and TRL copies it into
    a frozen `ref` adapter on the shared base (``ref_model`` None; ORPO has no reference and trains `policy`).
    Methods that change the base (full, freeze, head, modules, bitfit; our bottleneck modules, and MAM's with its
    prefix adapter): nothing may share weights the policy changes, so the SFT policy is loaded onto a fresh copy of
    the base and trained there, and the reference is a second fresh copy with the SFT policy loaded frozen (two extra
    copies of the base, said on the console; MAM's is handed to TRL as ``PrefixedReference``); the shared base is not
    touched.
    """

    def __init__(self, ctx: StageContext, stage: str, reference: bool = True):
        from alignment.errors import UserError
        from alignment.methods import BaseWeightMethod, BottleneckMethod, MamMethod, memory_note, method_for

        self.ctx, self.reference = ctx, reference
        self.method = method_for(ctx.adapter)
        self.sft = ctx.artifact("policy")
        self.separate = self.method.changes_base
        self.ref_model = None
        if not self.separate:
            if reference:
                continue_policy_as_default(ctx)
            else:
                ctx.policy.load_adapter("policy", self.sft, trainable=True)
            self.model = ctx.policy.model
            return
        if not isinstance(self.method, (BaseWeightMethod, BottleneckMethod)):
            raise UserError(f"stages.{ctx.index}.adapter.method: {self.method.name!r} is not supported by {stage}")
        from alignment.metrics import console

        self.trained = fresh_policy(ctx.policy)
        self.model = self.method.load(self.trained, "policy", self.sft, trainable=True)
        if reference:
            self.ref_model = self.method.load(fresh_policy(ctx.policy), "policy", self.sft).eval()
            self.ref_model.requires_grad_(False)
            if isinstance(self.method, MamMethod):  # its prefixes through TRL's fused log-prob head
                from alignment.policy import PrefixedReference

                self.ref_model = PrefixedReference(self.ref_model)
        copies = "its own copy of the base" + (" and the reference is another, frozen copy" if reference else "")
        console.print(f"adapter.method {self.method.name}: the policy changes base weights; {stage} trains it on "
                      f"{copies} ({memory_note(ctx.policy.base, 2 if reference else 1)})")

    def copy_reference(self) -> None:
        """After TRL made its `ref` adapter: load the SFT adapter's weights into it. TRL copies only parameters named
        `....default....`, which misses adapters whose parameter names end in the adapter name (IA3's
        `ia3_l.default`): its `ref` would keep IA3's initial scalings, i.e. the bare base, not the SFT policy."""
        if self.separate or not self.reference or TRL_REFERENCE not in self.ctx.policy.adapters:
            return
        from peft import set_peft_model_state_dict

        policy = self.ctx.policy
        if policy.model.peft_config[TRL_TRAINED].is_prompt_learning:  # the trained module itself (a prefix
            encoders = policy.model.prompt_encoder  # projection's encoder, not the virtual tokens peft's state holds)
            encoders[TRL_REFERENCE].load_state_dict(encoders[TRL_TRAINED].state_dict())
        else:
            set_peft_model_state_dict(policy.model, policy.adapter_state(TRL_TRAINED), adapter_name=TRL_REFERENCE)
        for name, param in policy.model.named_parameters():
            if name.endswith(f".{TRL_REFERENCE}") or f".{TRL_REFERENCE}." in name:
                param.requires_grad_(False)

    def reference_drift(self) -> float:
        """Max |reference - the SFT policy on disk|: the reference must still be exactly the SFT policy."""
        if not self.separate:
            return reference_drift(self.ctx.policy, self.sft)
        from safetensors.torch import load_file

        saved = {}
        for f in sorted(Path(self.sft).glob("*.safetensors")):
            saved.update(load_file(str(f)))
        state = self.ref_model.state_dict()
        if hasattr(self.ref_model, "peft_model"):  # MAM: the modules on the copy's base, and the prefixes
            model = self.ref_model.peft_model
            state = {**model.get_base_model().state_dict(),
                     "prompt_embeddings": model.prompt_encoder["policy"].embedding.weight}
        return max(float((state[k].float() - v.float()).abs().max()) for k, v in saved.items() if k in state)

    def save(self) -> Path:
        """This stage's `policy` artifact (an adapter folder, or a model folder for base-weight methods)."""
        ctx = self.ctx
        if not self.separate:
            if not self.reference:
                target = ctx.dir / "adapters" / "policy"
                ctx.policy.save_adapter("policy", target)
                return target
            return save_policy(ctx)
        target = ctx.dir / ("model" if self.method.family == "base" else "adapters/policy")
        self.method.save(self.trained, "policy", target)
        self.model = self.ref_model = self.trained = None  # the copies go; the shared base was never touched
        return target


def fresh_policy(shared):
    """A ``SharedPolicy`` on a fresh, frozen copy of the shared policy's base (as loaded from its folder)."""
    from transformers import AutoModelForCausalLM

    from alignment.policy import SharedPolicy

    base = AutoModelForCausalLM.from_pretrained(shared.model_path, dtype=shared.base.dtype).to(shared.base.device)
    base.requires_grad_(False)
    base.config.use_cache = True
    return SharedPolicy(base, shared.tokenizer, shared.model_path)


def continue_policy_as_default(ctx: StageContext) -> Path:
    """Load the `policy` artifact as TRL's trained adapter (`default`); TRL then copies it into the frozen `ref`."""
    policy = ctx.policy
    sft_adapter = ctx.artifact("policy")
    for name in (TRL_TRAINED, TRL_REFERENCE):
        policy.delete_adapter(name)
    policy.load_adapter(TRL_TRAINED, sft_adapter, trainable=True)
    return sft_adapter


def reference_drift(policy, sft_adapter: Path) -> float:
    """Max |TRL's `ref` adapter - the SFT adapter on disk|: the reference must still be exactly the SFT policy."""
    from safetensors.torch import load_file

    from alignment.policy import PROMPT_ENCODER_FILE

    sft_weights = load_file(sft_adapter / "adapter_model.safetensors")
    reference = {k.replace(f".{TRL_REFERENCE}.", "."): v for k, v in policy.adapter_state(TRL_REFERENCE).items()}
    drift = max(float((reference[k].float() - v.float()).abs().max()) for k, v in sft_weights.items())
    if (sft_adapter / PROMPT_ENCODER_FILE).is_file():  # P-tuning / prefix projection: the encoder itself too
        encoder = policy.model.prompt_encoder[TRL_REFERENCE].state_dict()
        saved = load_file(sft_adapter / PROMPT_ENCODER_FILE)
        drift = max([drift, *(float((encoder[k].float() - v.float()).abs().max()) for k, v in saved.items())])
    return drift


def save_policy(ctx: StageContext) -> Path:
    """Save TRL's `default` as this stage's `policy` artifact and leave only `policy` on the shared base."""
    policy = ctx.policy
    target = ctx.dir / "adapters" / "policy"
    policy.save_adapter(TRL_TRAINED, target)
    for name in (TRL_REFERENCE, TRL_TRAINED):
        policy.delete_adapter(name)
    policy.load_adapter("policy", target)
    return target


def trl_reward_metrics(trainer, evaluate: bool) -> dict[str, float]:
    """TRL's implicit-reward accuracy and margin (last logged values), and the eval loss/accuracy when evaluated."""
    metrics = {}
    last = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    for ours, theirs in (("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins")):
        if theirs in last:
            metrics[ours] = round(float(last[theirs]), 4)
    if evaluate:
        evaluated = trainer.evaluate()
        metrics["eval_loss"] = round(evaluated["eval_loss"], 4)
        if "eval_rewards/accuracies" in evaluated:
            metrics["eval_reward_accuracy"] = round(evaluated["eval_rewards/accuracies"], 4)
    return metrics


def record_reference(ctx: StageContext, sample: list[dict], ref_model=None) -> None:
    """Log-probs of a few chosen answers under the reference: TRL's `ref` adapter, or ``ref_model`` when given
    (checked against the SFT model in tests)."""
    from alignment.evaluation import completion_logprobs
    from alignment.io import atomic_write_json

    policy = ctx.policy
    prompts, chosen = [r["prompt"] for r in sample], [r["chosen"] for r in sample]
    if ref_model is not None:
        logps = completion_logprobs(ref_model, policy.tokenizer, prompts, chosen)
    else:
        with policy.using(TRL_REFERENCE):
            logps = completion_logprobs(policy.model, policy.tokenizer, prompts, chosen)
        policy.activate(TRL_TRAINED, trainable=True)
    atomic_write_json(ctx.dir / "reference_check.json", {"rows": sample, "reference_logprobs": logps})
