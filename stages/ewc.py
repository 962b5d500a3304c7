"""Elastic weight consolidation (Kirkpatrick et al., 2017): train a task under the penalty of the tasks before it.

A continual task stage. It trains its task like `sft` (TRL's SFTTrainer, through ``SFTStage``) or with DPO (TRL's
DPOTrainer on pairs: the right answer against each wrong one), adding (lambda / 2) sum_k F_k (theta - theta*_k)^2 to
the loss, where each earlier `ewc` stage of the same adapter left a diagonal Fisher F_k and its anchor theta*_k.
After training it estimates this task's Fisher from per-sample gradients on `fisher_samples` examples and saves it
with the anchor (the trained parameters) as the `ewc:<adapter>` artifact: one penalty per task (`mode: separate`),
or one running penalty, F <- gamma F + F_new, anchored at the newest parameters (`mode: online`).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignment.config import DataSource, StageConfig
from alignment.continual import TaskSpec
from alignment.stage import StageContext, StageResult
from stages.sft import SFTConfig, SFTStage


class EWCConfig(SFTConfig):
    kind: Literal["ewc"] = "ewc"
    data: DataSource  # the task's data (toy:task/<name>, or a file: see docs/continual.md)
    ewc_lambda: float = Field(10.0, ge=0.0)  # penalty strength lambda (the Fisher is normalised to mean 1)
    mode: Literal["separate", "online"] = "separate"
    gamma: float = Field(1.0, gt=0.0, le=1.0)  # online mode: decay of the running Fisher
    fisher_samples: int = Field(200, ge=1)  # examples of this task whose per-sample gradients make its Fisher
    objective: Literal["sft", "dpo"] = "sft"
    beta: float = Field(0.1, gt=0)  # dpo objective: TRL's beta
    sft_weight: float = Field(0.0, ge=0.0)  # dpo objective: + NLL on the right answers (RPO)

    def continual_tasks(self) -> list[TaskSpec]:
        return [TaskSpec.from_stage(self.task, self.data, self.eval_data, self.columns)]

    def check_chain(self, index: int, earlier: list[StageConfig]) -> list[str]:
        problems = super().check_chain(index, earlier)
        for j, stage in enumerate(earlier):
            if isinstance(stage, EWCConfig) and stage.adapter_name == self.adapter_name and stage.mode != self.mode:
                problems.append(
                    f"stages.{index}.mode: stage {j} keeps a {stage.mode!r} EWC penalty on adapter "
                    f"{self.adapter_name!r}; use one mode for the whole chain"
                )
        return problems


def penalty_artifact(adapter_name: str) -> str:
    return f"ewc:{adapter_name}"


class EWCStage(SFTStage):
    """A continual task trained under the EWC penalty of earlier tasks (SFT or DPO objective); saves its Fisher."""

    Config = EWCConfig

    @classmethod
    def produces(cls, config: EWCConfig) -> set[str]:
        return {config.adapter_name, penalty_artifact(config.adapter_name)}

    def run(self, ctx: StageContext) -> StageResult:
        cfg = self.config
        self.penalties = load_penalties(ctx.artifacts.get(penalty_artifact(cfg.adapter_name)))
        result = super().run(ctx) if cfg.objective == "sft" else self._run_dpo(ctx)
        folder = self._save_penalty(ctx)
        result.artifacts[penalty_artifact(cfg.adapter_name)] = ctx.relative(folder)
        result.metrics.update({"ewc_tasks_protected": len(self.penalties), "fisher_samples": self.fisher_count})
        return result

    def trainer_class(self, ctx: StageContext):
        return ewc_trainer(super().trainer_class(ctx), self.penalties, self.config.ewc_lambda)

    # ------------------------------------------------------------------------------------------ DPO objective

    def _run_dpo(self, ctx: StageContext) -> StageResult:
        from datasets import Dataset
        from trl import DPOConfig as TRLDPOConfig
        from trl import DPOTrainer

        from alignment.continual import preference_rows
        from alignment.training import trainer_callbacks, trl_args, use_console_progress
        from alignment.truncation import fit_pairs
        from stages.dpo import TRL_REFERENCE, TRL_TRAINED, trl_reward_metrics

        cfg, policy = self.config, ctx.policy
        task = self.task_data(ctx, cfg.continual_tasks()[0].name)
        fitted = fit_pairs(preference_rows(task.train), cfg, policy.tokenizer, f"stages.{ctx.index}.data")
        rows = fitted.rows
        random.Random(ctx.seed).shuffle(rows)
        rows = rows[: cfg.max_samples] if cfg.max_samples else rows
        # TRL copies the adapter named `default` into the frozen reference `ref`: the reference is this adapter as
        # the earlier stages left it (a fresh adapter, i.e. the base model, for the first task).
        for name in (TRL_TRAINED, TRL_REFERENCE):
            policy.delete_adapter(name)
        if cfg.adapter_name in ctx.artifacts:
            policy.load_adapter(TRL_TRAINED, ctx.artifacts[cfg.adapter_name], trainable=True)
        else:
            policy.add_adapter(TRL_TRAINED, ctx.adapter)
        args = TRLDPOConfig(
            **trl_args(cfg, ctx),
            beta=cfg.beta,
            loss_type=["sigmoid", "sft"] if cfg.sft_weight else ["sigmoid"],
            loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight else None,
            eval_strategy="no",
        )
        trainer = ewc_trainer(DPOTrainer, self.penalties, cfg.ewc_lambda)(
            model=policy.model,
            ref_model=None,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=policy.tokenizer,
            callbacks=trainer_callbacks(ctx.logger),
        )
        use_console_progress(trainer)
        from alignment.trainer_hooks import train

        train_loss = train(trainer, ctx)  # checkpoints, resume, NaN guard
        policy.model.eval()
        metrics = {"train_loss": round(train_loss, 4), "train_pairs": len(rows), **fitted.metrics(),
                   **trl_reward_metrics(trainer, False)}
        self._dpo_reference = TRL_REFERENCE  # the Fisher of the DPO loss needs the reference's log-probs
        self.fisher = self._fisher(ctx, TRL_TRAINED)
        target = ctx.dir / "adapters" / cfg.adapter_name
        policy.save_adapter(TRL_TRAINED, target)
        for name in (TRL_REFERENCE, TRL_TRAINED):
            policy.delete_adapter(name)
        policy.load_adapter(cfg.adapter_name, target)
        result = StageResult(metrics, {cfg.adapter_name: ctx.relative(target)})
        result.info.update(ctx.task_accuracy())
        return result

    # ----------------------------------------------------------------------------------------------- Fisher

    def _save(self, ctx: StageContext):
        """After SFT training (the adapter still active and trained): this task's Fisher, then the adapter."""
        self.fisher = self._fisher(ctx, self.config.adapter_name)
        return super()._save(ctx)

    def _fisher(self, ctx: StageContext, adapter: str) -> dict:
        from alignment.algorithms.ewc import fisher_diagonal
        from alignment.metrics import console

        cfg, policy = self.config, ctx.policy
        task = self.task_data(ctx, cfg.continual_tasks()[0].name)
        examples = random.Random(ctx.seed + 1).sample(task.train, min(cfg.fisher_samples, len(task.train)))
        self.fisher_count = len(examples)
        params = named_trainable(policy.model, adapter)
        losses = [self._sample_loss(ctx, e) for e in examples]
        with console.status(f"EWC: Fisher of {len(params)} tensors from {len(examples)} per-sample gradients"):
            fisher = fisher_diagonal(params, losses)
        anchor = {n: p.detach().clone() for n, p in params.items()}
        return {"fisher": fisher, "anchor": anchor}

    def _sample_loss(self, ctx: StageContext, example: dict):
        """A closure: this example's loss (NLL of the right answer; the DPO loss for the dpo objective)."""
        import torch

        from alignment.policy import real_token_logits

        policy, tok = ctx.policy, ctx.policy.tokenizer
        prompt, answer = example["prompt"], example["choices"][example["answer"]]

        def completion_logp(completion: str) -> torch.Tensor:
            start = len(tok(prompt).input_ids)
            ids = tok(prompt + completion).input_ids + [tok.eos_token_id]
            ids_t = torch.tensor([ids], device=policy.model.device)
            logits = real_token_logits(policy.model(input_ids=ids_t).logits, ids_t)  # prompt tuning: real tokens only
            logps = torch.log_softmax(logits[0, :-1].float(), -1)
            return logps.gather(-1, ids_t[0, 1:, None]).squeeze(-1)[start - 1 :]

        if self.config.objective == "sft":
            return lambda: -completion_logp(answer).mean()

        def dpo_loss() -> torch.Tensor:
            wrong = [c for i, c in enumerate(example["choices"]) if i != example["answer"]]
            with torch.no_grad(), policy.using(self._dpo_reference):
                reference = [completion_logp(c).sum() for c in [answer, *wrong]]
            policy.activate("default", trainable=True)
            chosen = completion_logp(answer).sum() - reference[0]
            margins = [chosen - (completion_logp(c).sum() - ref) for c, ref in zip(wrong, reference[1:])]
            return -torch.nn.functional.logsigmoid(self.config.beta * torch.stack(margins)).mean()

        return dpo_loss

    def _save_penalty(self, ctx: StageContext) -> Path:
        """The `ewc:<adapter>` folder: earlier penalties plus this task's (separate), or the merged one (online)."""
        from alignment.algorithms.ewc import online_fisher
        from alignment.io import atomic_dir

        cfg = self.config
        task = cfg.continual_tasks()[0].name
        with atomic_dir(ctx.dir / "ewc") as tmp:
            if cfg.mode == "separate":
                previous = ctx.artifacts.get(penalty_artifact(cfg.adapter_name))
                for f in sorted(Path(previous).glob("penalty-*.safetensors")) if previous else []:
                    shutil.copy(f, tmp / f.name)
                save_penalty(tmp / f"penalty-{len(self.penalties)}-{task}.safetensors", self.fisher, task)
            else:
                old = self.penalties[0]["fisher"] if self.penalties else None
                merged = {"fisher": online_fisher(old, self.fisher["fisher"], cfg.gamma), "anchor": self.fisher["anchor"]}
                tasks = (self.penalties[0]["task"] + "+" if self.penalties else "") + task
                save_penalty(tmp / "penalty-0-online.safetensors", merged, tasks)
        return ctx.dir / "ewc"


# ------------------------------------------------------------------------------------------------- helpers


def stable_name(name: str, adapter: str) -> str:
    """A parameter's name without the adapter's: peft's state-dict key (LoRA's `lora_A.<adapter>.weight`, IA3's
    `ia3_l.<adapter>` with the name last, a prompt encoder's `prompt_encoder.<adapter>.`), or the plain name (base
    weights, bottleneck modules)."""
    name = name.replace(f".{adapter}.", ".")
    return name[: -len(adapter) - 1] if adapter and name.endswith(f".{adapter}") else name


def named_trainable(model, adapter: str) -> dict:
    """Trainable parameters by their stable name (``stable_name``): what a task's Fisher covers."""
    return {stable_name(n, adapter): p for n, p in model.named_parameters() if p.requires_grad}


def named_covered(model, adapter: str, penalties: list[dict]) -> dict:
    """The parameters the penalties' Fishers cover, by stable name, whether they train at this step or not:
    progressive unfreezing (``unfreeze_every``) leaves the lower layers without ``requires_grad`` for a while, and
    their penalty is still owed (it only has no gradient until they join)."""
    covered = {n for p in penalties for n in p["fisher"]}
    return {s: p for n, p in model.named_parameters() if (s := stable_name(n, adapter)) in covered}


def save_penalty(path: Path, penalty: dict, task: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"fisher.{n}": t.contiguous() for n, t in penalty["fisher"].items()}
    tensors.update({f"anchor.{n}": t.float().contiguous() for n, t in penalty["anchor"].items()})
    save_file(tensors, str(path), metadata={"task": task})


def load_penalties(folder: Path | None) -> list[dict]:
    """[{"fisher", "anchor", "task"}] from an `ewc:<adapter>` folder, in the order the tasks were trained."""
    from safetensors import safe_open

    out = []
    files = sorted(Path(folder).glob("penalty-*.safetensors"), key=lambda f: int(f.name.split("-")[1])) if folder else []
    for f in files:
        with safe_open(str(f), "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            task = handle.metadata().get("task", f.stem)
        fisher = {k[len("fisher.") :]: v for k, v in tensors.items() if k.startswith("fisher.")}
        anchor = {k[len("anchor.") :]: v for k, v in tensors.items() if k.startswith("anchor.")}
        out.append({"fisher": fisher, "anchor": anchor, "task": task})
    return out


def ewc_trainer(trainer_cls, penalties: list[dict], ewc_lambda: float):
    """A subclass of a TRL trainer whose loss adds (lambda / 2) sum_k F_k (theta - theta*_k)^2 while training."""
    from alignment.algorithms.ewc import ewc_penalty

    class EWCTrainer(trainer_cls):
        _ewc_logged: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if not penalties or not ewc_lambda or not self.model.training:
                return result
            loss, outputs = result if return_outputs else (result, None)
            if not hasattr(self, "_ewc_params"):
                adapter = getattr(self.model, "active_adapter", "")
                self._ewc_params, self._ewc_logged = named_covered(self.model, adapter, penalties), []
            penalty = ewc_lambda / 2 * sum(ewc_penalty(self._ewc_params, p["fisher"], p["anchor"]) for p in penalties)
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
            loss = loss + (penalty / self.current_gradient_accumulation_steps if scaled else penalty)
            self._ewc_logged.append(float(penalty.detach()))
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if getattr(self, "_ewc_logged", None):
                logs["ewc_penalty"] = round(sum(self._ewc_logged) / len(self._ewc_logged), 6)
                self._ewc_logged = []
            super().log(logs, *args, **kwargs)

    return EWCTrainer
