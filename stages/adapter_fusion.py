"""AdapterFusion (Pfeiffer et al., 2021): compose frozen per-task LoRA adapters with a learned per-layer attention.

Knowledge extraction is the chain's task stages, each training its own adapter (`adapter_name: <task>`). This stage
loads those adapters frozen, puts an ``alignment.fusion.AdapterFusion`` over them (per transformer layer, an
attention over the adapters' outputs) and trains only the fusion layers on `samples_per_task`
training rows of every task seen so far, mixed, in a short loop of our own (only the fusion layers learn). The fused model is then evaluated on every task from the prompt
alone: nothing tells it which task a prompt belongs to.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from alignment.config import StageConfig
from alignment.stage import StageContext, StageResult


class AdapterFusionConfig(StageConfig):
    kind: Literal["adapter_fusion"] = "adapter_fusion"
    adapters: list[str] = Field(min_length=1)  # the task adapters to fuse, trained by earlier task stages
    samples_per_task: int = Field(100, ge=1)  # training rows drawn from every task seen so far
    dim: int = Field(16, ge=1)  # query/key size of each fusion attention
    learn_value: bool = False  # also learn a value projection (starts as the identity)
    query: Literal["prompt", "token"] = "prompt"  # prompt: the prompt's last hidden state; token: Pfeiffer's per-token
    route_loss: float = Field(1.0, ge=0.0)  # + this x NLL of the attention on the adapter of the row's own task
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(5e-3, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(256, ge=8)
    checkpoint_every: int = Field(50, ge=1)  # optimiser steps between checkpoints (a killed run resumes from the last)

    def continual_tasks(self) -> list:
        return []  # composes the chain's tasks, trains none of its own

    def check_chain(self, index: int, earlier: list[StageConfig]) -> list[str]:
        task_adapters = {
            getattr(stage, "adapter_name", None) for stage in earlier if stage.continual_tasks()
        } - {None}
        if not task_adapters:
            return [
                f"stages.{index}.kind: adapter_fusion fuses the adapters of earlier task stages, and there are none; "
                "put task stages (kind sft or ewc, one `adapter_name` per task) before it"
            ]
        return [
            f"stages.{index}.adapters: {name!r} is not trained by an earlier task stage; fuse some of "
            f"{', '.join(sorted(task_adapters))}"
            for name in self.adapters
            if name not in task_adapters
        ]


class AdapterFusionStage:
    """AdapterFusion: learns a per-layer attention over frozen task adapters; evaluated without task identity."""

    Config = AdapterFusionConfig

    def __init__(self, config: AdapterFusionConfig):
        self.config = config

    @classmethod
    def requires(cls, config: AdapterFusionConfig) -> set[str]:
        return set(config.adapters)

    @classmethod
    def produces(cls, config: AdapterFusionConfig) -> set[str]:
        return {"fusion"}

    def run(self, ctx: StageContext) -> StageResult:
        from alignment.continual import sft_rows
        from alignment.errors import UserError
        from alignment.fusion import AdapterFusion

        cfg, policy = self.config, ctx.policy
        for name in cfg.adapters:
            policy.load_adapter(name, ctx.artifact(name), trainable=False)
        fusion = AdapterFusion(policy.model, cfg.adapters, cfg.dim, cfg.learn_value, cfg.query)

        rng = random.Random(ctx.seed)
        tasks = ctx.chain.trained if ctx.chain is not None else []
        rows = []
        owner = self._adapter_of_task(ctx)
        for task in tasks:
            data = ctx.chain.data(task)
            sample = rng.sample(sft_rows(data.train), min(cfg.samples_per_task, len(data.train)))
            target = cfg.adapters.index(owner[task]) if owner.get(task) in cfg.adapters else -100
            rows += [{**r, "adapter": target} for r in sample]
        rng.shuffle(rows)
        if not rows:
            raise UserError(f"stages.{ctx.index}: adapter_fusion found no task data to train on; run it in a chain")

        fusion.calibrate(_prompt_batches(policy, [r["prompt"] for r in rows]))
        train_loss = self._train(ctx, fusion, rows)
        metrics = {
            "train_loss": round(train_loss, 4),
            "train_samples": len(rows),
            "samples_per_task": cfg.samples_per_task,
            "fusion_parameters": sum(p.numel() for p in fusion.parameters()),
        }
        from alignment.fusion import FusedModel

        info = ctx.task_accuracy(FusedModel(fusion))
        info["fusion_weights"] = self._weights_by_task(ctx, fusion, tasks)
        target = ctx.dir / "fusion"
        fusion.save(target, {name: str(ctx.artifact(name)) for name in cfg.adapters})
        return StageResult(metrics=metrics, artifacts={"fusion": ctx.relative(target)}, info=info)

    def _train(self, ctx: StageContext, fusion, rows: list[dict]) -> float:
        """Our own short loop (like the reward stage's): only the fusion layers learn; loss on the answer tokens."""
        import math

        import torch
        from transformers import get_scheduler

        from alignment import checkpoint
        from alignment.fusion import FusedModel
        from alignment.guards import GradNormMonitor

        cfg, tokenizer = self.config, ctx.policy.tokenizer
        fused = FusedModel(fusion)
        # an earlier TRL stage may have left gradient checkpointing on; its recomputation would run outside the
        # fusion hooks (they are only attached during the forward pass)
        inner = ctx.policy.model.get_base_model()
        if getattr(inner, "is_gradient_checkpointing", False):
            inner.gradient_checkpointing_disable()
        params = list(fusion.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        per_epoch = math.ceil(len(rows) / cfg.batch_size)
        total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * per_epoch)
        schedule = get_scheduler(cfg.lr_scheduler, optimizer, int(cfg.warmup_ratio * total), total)
        encoded = []
        for r in rows:  # prompt + answer + eos, as the task adapters were trained
            ids = tokenizer(r["prompt"] + r["completion"]).input_ids + [tokenizer.eos_token_id]
            encoded.append((ids[: cfg.max_length], len(tokenizer(r["prompt"]).input_ids), r["adapter"]))
        rng, step, losses, pending = random.Random(ctx.seed), 0, [], []
        # a checkpoint: the fusion layers (parameters and calibration buffers, restored in place), the optimiser,
        # the scheduler, the torch and Python RNGs, the step, the losses so far and the rest of this epoch's order
        tensors = dict(fusion.state_dict())
        resumed = checkpoint.read_stage_checkpoint(ctx, (), tensors, {"optimizer": optimizer})
        if resumed is not None:
            step, losses, pending = resumed["step"], resumed["losses"], resumed["order"]
            schedule.load_state_dict(resumed["scheduler"])
            checkpoint.set_python_rng_state(rng, resumed["rng"])
        monitor = GradNormMonitor(ctx.label, ctx.dir)
        fused.train()
        while step < total:
            if not pending:  # a new epoch: reshuffle (the last batch of an epoch may be short)
                pending = list(range(len(encoded)))
                rng.shuffle(pending)
            batch, pending = [encoded[i] for i in pending[: cfg.batch_size]], pending[cfg.batch_size :]
            ids, mask, labels, prompt_lengths = _collate([b[:2] for b in batch], tokenizer.pad_token_id, fused.device)
            logits = fused(input_ids=ids, attention_mask=mask, prompt_lengths=prompt_lengths).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            targets = torch.tensor([b[2] for b in batch], device=fused.device)
            if cfg.route_loss and (targets != -100).any():
                # without it the routing often settles on a wrong adapter per layer (measured: 1 seed in 3)
                route = [torch.nn.functional.nll_loss(torch.log(w.float() + 1e-9), targets) for w in fusion.layer_weights()]
                loss = loss + cfg.route_loss * torch.stack(route).mean()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            monitor.check(step + 1, float(grad_norm))  # NaN/inf stops before the step; spikes are logged
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            if step % ctx.pipeline.logging.log_every == 0 or step == total:
                recent = losses[-ctx.pipeline.logging.log_every :]
                ctx.logger.log(step, {"loss": round(sum(recent) / len(recent), 6), "grad_norm": round(float(grad_norm), 6),
                                      "learning_rate": schedule.get_last_lr()[0], "epoch": round(step / per_epoch, 4)})
            if checkpoint.due(ctx, step, cfg.checkpoint_every, total):
                state = {"step": step, "losses": losses, "order": pending, "scheduler": schedule.state_dict(),
                         "rng": checkpoint.python_rng_state(rng)}
                checkpoint.write_stage_checkpoint(ctx, step, (), tensors, {"optimizer": optimizer}, state)
        fused.eval()
        for p in params:
            p.requires_grad_(False)
        return sum(losses) / len(losses)

    def _adapter_of_task(self, ctx: StageContext) -> dict[str, str]:
        """task -> the adapter the last earlier task stage trained on it (the routing target of its rows)."""
        out = {}
        for stage in ctx.pipeline.stages[: ctx.index]:
            for spec in stage.continual_tasks() or []:
                if getattr(stage, "adapter_name", None):
                    out[spec.name] = stage.adapter_name
        return out

    @staticmethod
    def _weights_by_task(ctx: StageContext, fusion, tasks: list[str]) -> dict[str, dict[str, float]]:
        """Mean attention each adapter gets at the last prompt token of each task's held-out prompts (the routing)."""
        import torch

        from alignment.fusion import FusedModel

        policy, out = ctx.policy, {}
        side, policy.tokenizer.padding_side = policy.tokenizer.padding_side, "left"
        try:
            for task in tasks:
                prompts = [e["prompt"] for e in ctx.chain.data(task).eval[:32]]
                batch = policy.tokenizer(prompts, return_tensors="pt", padding=True).to(policy.model.device)
                width = torch.full((len(prompts),), batch["input_ids"].shape[1])
                with torch.no_grad():
                    FusedModel(fusion)(**batch, prompt_lengths=width)
                out[task] = fusion.mean_weights(last_token=True)
        finally:
            policy.tokenizer.padding_side = side
        return out


def _prompt_batches(policy, prompts: list[str], size: int = 64):
    """(input_ids, attention_mask, last prompt index) batches of right-padded prompts, for the fusion's calibration."""
    tokenizer, device = policy.tokenizer, policy.model.device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for lo in range(0, len(prompts), size):
            batch = tokenizer(prompts[lo : lo + size], return_tensors="pt", padding=True).to(device)
            yield batch["input_ids"], batch["attention_mask"], batch["attention_mask"].sum(1) - 1
    finally:
        tokenizer.padding_side = side


def _collate(batch: list[tuple[list[int], int]], pad: int, device):
    """Right-padded input ids, attention mask, labels (-100 on the prompt and padding) and prompt lengths."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (seq, prompt_len) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, prompt_len : len(seq)] = torch.tensor(seq[prompt_len:])
    lengths = torch.tensor([prompt_len for _, prompt_len in batch])
    return ids.to(device), mask.to(device), labels.to(device), lengths
