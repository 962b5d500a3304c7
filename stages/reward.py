"""Reward-model training: Bradley-Terry (optionally with a margin) on preference pairs.

TRL's RewardTrainer wants a ``num_labels=1`` sequence-classification model; ours is a score head on the shared
causal-LM base (the `reward` adapter), so this stage runs its own small loop (about 40 lines below) and saves the
result as a stock SEQ_CLS peft folder (see ``reward_models/trained.py``).
"""

from __future__ import annotations

import random
import statistics
from typing import Literal

from pydantic import Field

from alignment.config import DataSource, ScheduleFields
from alignment.stage import StageContext, StageResult


class RewardConfig(ScheduleFields):  # + layer_lr_decay, unfreeze_every, unfreeze_unit (schedules.py)
    kind: Literal["reward"] = "reward"
    data: DataSource = "toy:preference"  # eval_data default: toy:preference_eval for toy data, else eval_fraction
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    adapter_name: str = "reward"
    margin: float = Field(0.0, ge=0.0)  # BT with margin: -log sigmoid(r_c - r_r - margin); a `margin` column wins
    center_rewards_coefficient: float = Field(0.0, ge=0.0)  # + coef * mean((r_c + r_r)^2), keeps rewards near 0


class RewardStage:
    """Reward model (Bradley-Terry): a score head + a `reward` adapter (LoRA family) on the shared base, or, for a
    method that changes the base (trains base weights, or hooks bottleneck modules into it, MAM with its prefix
    adapter), on a copy of the base of its own."""

    Config = RewardConfig

    def __init__(self, config: RewardConfig):
        self.config = config

    @classmethod
    def requires(cls, config: RewardConfig) -> set[str]:
        return set()

    @classmethod
    def produces(cls, config: RewardConfig) -> set[str]:
        return {"reward_model", "preference_data"}

    def run(self, ctx: StageContext) -> StageResult:
        import torch
        from transformers import get_scheduler

        from alignment.algorithms.preference import bradley_terry_loss, pairwise_accuracy
        from alignment.data import preference_rows
        from alignment.truncation import fit_pairs
        from alignment.io import atomic_write_json
        from reward_models.trained import new_score_head, save_base_reward_model, save_reward_model, sequence_rewards

        from alignment import checkpoint, distributed
        from alignment.guards import GradNormMonitor

        cfg, policy = self.config, ctx.policy
        world, rank = distributed.world_size(), distributed.rank()
        field = f"stages.{ctx.index}.data"
        rows, identical = preference_rows(cfg.data, cfg.columns, field, policy.tokenizer)
        # prompts cut from the left to fit max_length with both answers (scored without eos); pairs that cannot fit
        # or are one token sequence are dropped and counted
        fitted = fit_pairs(rows, cfg, policy.tokenizer, field, eos=False, already_identical=identical)
        rows, fit_metrics = fitted.rows, fitted.metrics()
        rng = random.Random(ctx.seed)
        rng.shuffle(rows)
        if cfg.max_samples:
            rows = rows[: cfg.max_samples]
        eval_source = cfg.eval_data or ("toy:preference_eval" if cfg.data == "toy:preference" else None)
        if eval_source:
            field = f"stages.{ctx.index}.eval_data"
            eval_rows, identical = preference_rows(eval_source, cfg.columns, field, policy.tokenizer)
            eval_fitted = fit_pairs(eval_rows, cfg, policy.tokenizer, field, eos=False, already_identical=identical)
            eval_rows = eval_fitted.rows
            fit_metrics.update(eval_fitted.metrics(split="eval_"))
        else:
            n_eval = max(1, int(len(rows) * cfg.eval_fraction))
            eval_rows, rows = rows[:n_eval], rows[n_eval:]

        scorer, adapter = self._scorer(ctx)  # the shared policy with a `reward` adapter, or a copy of the base
        head = new_score_head(policy.base.config.hidden_size, policy.base.dtype, policy.base.device)
        params = scorer.trainable_parameters() + list(head.parameters())
        optimizer, unfreezing = self._optimizer(scorer, head, params)  # LLRD / progressive unfreezing when set
        steps_per_epoch = -(-len(rows) // (cfg.batch_size * cfg.gradient_accumulation_steps * world))
        total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(steps_per_epoch * cfg.epochs))
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, int(total * cfg.warmup_ratio), total)

        def rewards(batch, key):
            texts = [r["prompt"] + r[key] for r in batch]
            return sequence_rewards(scorer, adapter, head, texts, cfg.max_length)

        if world > 1:  # data parallel through accelerate (DDP): gradients are averaged over the ranks
            from accelerate import Accelerator

            ddp = Accelerator().prepare_model(_reward_net(scorer, adapter, head, cfg.max_length))
            train_rewards = lambda batch, key: ddp([r["prompt"] + r[key] for r in batch])  # noqa: E731
        else:
            train_rewards = rewards

        # the loop: shuffle each epoch, BT loss on (chosen, rejected), clip, step
        scorer.model.train()
        step, order, recent, seen = 0, [], [], 0
        head_tensors = dict(head.named_parameters())
        if adapter is None:  # base weights: checkpointed as tensors, with the head
            head_tensors.update({f"base.{n}": p for n, p in scorer.model.named_parameters() if p.requires_grad})
        adapters = (adapter,) if adapter else ()
        resumed = checkpoint.read_stage_checkpoint(ctx, adapters, head_tensors, {"optimizer": optimizer})
        if resumed is not None:
            step, order, recent, seen = resumed["step"], resumed["order"], resumed["recent"], resumed["seen"]
            scheduler.load_state_dict(resumed["scheduler"])
            checkpoint.set_python_rng_state(rng, resumed["rng"])
        monitor = GradNormMonitor(ctx.label, ctx.dir)
        from alignment.methods import method_for

        # recompute activations in backward (not with MAM's prefixes: a checkpointed layer drops their cache)
        with scorer.checkpointing(cfg.gradient_checkpointing and method_for(ctx.adapter).checkpoint_online):
            while step < total:
                if unfreezing is not None:
                    unfreezing.apply(step, step / steps_per_epoch)
                for _ in range(cfg.gradient_accumulation_steps):
                    if len(order) < cfg.batch_size * world:
                        order = list(range(len(rows)))
                        rng.shuffle(order)  # the same order on every rank (same seed); each takes its own share
                    block, order = order[: cfg.batch_size * world], order[cfg.batch_size * world :]
                    batch = [rows[i] for i in block[rank::world]]
                    seen += len(batch)
                    chosen, rejected = train_rewards(batch, "chosen"), train_rewards(batch, "rejected")
                    margin = torch.tensor([float(r.get("margin", cfg.margin)) for r in batch], device=chosen.device)
                    loss = bradley_terry_loss(chosen, rejected, margin)
                    if cfg.center_rewards_coefficient:
                        loss = loss + cfg.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
                    (loss / cfg.gradient_accumulation_steps).backward()
                if unfreezing is not None:  # groups not yet unfrozen stay still (the adapter switch re-enables them)
                    unfreezing.hold(step, step / steps_per_epoch)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                monitor.check(step + 1, float(grad_norm))  # NaN/inf stops before the step; spikes are logged
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                accuracy = pairwise_accuracy(chosen, rejected)  # ties count half
                recent = (recent + [(loss.item(), accuracy)])[-50:]
                if step % ctx.pipeline.logging.log_every == 0 or step == total:
                    ctx.logger.log(step, {"loss": loss.item(), "accuracy": accuracy, "grad_norm": float(grad_norm),
                                          "margin": (chosen - rejected).mean().item(),
                                          "learning_rate": scheduler.get_last_lr()[0]})
                if checkpoint.due(ctx, step, cfg.checkpoint_every, total):  # multi-process: rank 0 writes, all wait
                    state = {"step": step, "order": order, "recent": recent, "seen": seen,
                             "scheduler": scheduler.state_dict(), "rng": checkpoint.python_rng_state(rng)}
                    checkpoint.write_stage_checkpoint(ctx, step, adapters, head_tensors,
                                                      {"optimizer": optimizer}, state)
        scorer.model.eval()
        if unfreezing is not None:
            unfreezing.on_train_end(None, None, None)  # the method's trainable set, as it was
        if world > 1:
            import sys

            weights = sum(float(p.detach().double().sum()) for p in params)  # equal on every rank: DDP kept them in sync
            print(f"rank {rank}/{world}: trained on {seen} pairs (weights checksum {weights:.8f})", file=sys.stderr,
                  flush=True)

        metrics = {
            "train_loss": round(statistics.fmean(x for x, _ in recent), 4),
            "train_accuracy": round(statistics.fmean(a for _, a in recent), 4),
            "train_pairs": len(rows),
            **fit_metrics,
            **self._evaluate(eval_rows, rewards, cfg.batch_size),
        }
        with torch.no_grad():
            train_scores = torch.cat([rewards(rows[i : i + 64], k) for i in range(0, min(len(rows), 512), 64) for k in ("chosen", "rejected")])
        stats = {"mean": train_scores.mean().item(), "std": train_scores.std().item(), "source": cfg.data}
        metrics.update(reward_mean=round(stats["mean"], 4), reward_std=round(stats["std"], 4))

        folder = ctx.dir / "reward_model"
        if adapter is None:
            save_base_reward_model(scorer, head, folder, stats, ctx.adapter)
        else:
            save_reward_model(scorer, adapter, head, folder, stats)
        atomic_write_json(ctx.dir / "preference_data.json", {"source": cfg.data, "columns": cfg.columns})
        return StageResult(
            metrics=metrics,
            artifacts={"reward_model": ctx.relative(folder), "preference_data": ctx.relative(ctx.dir / "preference_data.json")},
        )

    def _optimizer(self, scorer, head, params):
        """(AdamW, progressive-unfreezing schedule or None). With `layer_lr_decay` / `unfreeze_every`: the
        parameter groups of alignment/schedules.py, the score head in the top group (the one trained first)."""
        import torch

        from alignment.methods import num_layers
        from alignment.schedules import ProgressiveUnfreezing, parameter_groups

        cfg = self.config
        if not cfg.layer_lr_decay and not cfg.unfreeze_every:
            return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay), None
        groups = parameter_groups(scorer.model, cfg.learning_rate, cfg.weight_decay, cfg.layer_lr_decay)
        groups.append({"params": list(head.parameters()), "names": ["score.weight"], "lr": cfg.learning_rate,
                       "depth": num_layers(scorer.base) + 1, "weight_decay": cfg.weight_decay})
        every = ProgressiveUnfreezing(groups, cfg.unfreeze_every, cfg.unfreeze_unit) if cfg.unfreeze_every else None
        return torch.optim.AdamW(groups), every

    def _scorer(self, ctx: StageContext):
        """(policy to score with, adapter name): a fresh `reward` adapter on the shared base (peft methods), or, for
        a method that changes the base (base weights, bottleneck modules, MAM) or cannot sit beside LoRA adapters
        (IA3, prompt learning),
        a copy of the base of its own (adapter None), as nothing may share weights or layers it changes; PPO later
        holds that reward model as a separate frozen model."""
        from alignment.methods import method_for
        from alignment.metrics import console
        from stages.dpo import fresh_policy

        method, policy = method_for(ctx.adapter), ctx.policy
        if not method.own_copy:
            policy.add_adapter(self.config.adapter_name, ctx.adapter)
            return policy, self.config.adapter_name
        from alignment.methods import memory_note

        scorer = fresh_policy(policy)
        method.prepare(scorer, self.config.adapter_name)  # bottleneck: the modules go into the copy's layers (IA3:
        # its adapter, active, so the copy's backbone applies it; only its scalings train; prompt learning: only the
        # virtual tokens or their encoder train, sequence_rewards runs peft's forward to put them in)
        what = {"base": "trains base weights", "modules": "hooks its modules into the base's layers",
                "peft": "is a peft adapter of another type than the LoRA policy/value adapters"}[method.family]
        console.print(f"adapter.method {method.name}: the reward model {what}, on its own copy of the base "
                      f"({memory_note(policy.base, 1)}; online stages hold it as a separate frozen model)")
        return scorer, None

    @staticmethod
    def _evaluate(eval_rows, rewards, batch_size) -> dict[str, float]:
        """eval_accuracy (against the noiseless gold label when the data has one), the noisy-label accuracy, and
        the "longer answer wins" baseline (against the same labels); in all three a tie counts half. tie_rate: the
        share of pairs whose two rewards are equal."""
        import torch

        from alignment.algorithms.preference import pairwise_accuracy, tie_rate

        chosen, rejected, longer_wins = [], [], []
        with torch.no_grad():
            for i in range(0, len(eval_rows), batch_size):
                batch = eval_rows[i : i + batch_size]
                chosen.append(rewards(batch, "chosen").cpu())
                rejected.append(rewards(batch, "rejected").cpu())
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        truth = [r.get("gold_chosen_is_better", True) for r in eval_rows]
        for r, t in zip(eval_rows, truth):
            lc, lr = len(r["chosen"].split()), len(r["rejected"].split())
            longer_wins.append(0.5 if lc == lr else float((lc > lr) == t))
        return {
            "eval_accuracy": round(pairwise_accuracy(chosen, rejected, torch.tensor(truth)), 4),
            "eval_accuracy_noisy": round(pairwise_accuracy(chosen, rejected), 4),
            "tie_rate": round(tie_rate(chosen, rejected), 4),
            "length_baseline_accuracy": round(statistics.fmean(longer_wins), 4),
            "eval_pairs": len(eval_rows),
        }


def _reward_net(policy, adapter_name, head, max_length):
    """The reward adapter + head as one module, so that accelerate can wrap it in DDP (multi-process runs only)."""
    import torch

    from reward_models.trained import sequence_rewards

    class RewardNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.head = policy.model, head

        def forward(self, texts):
            return sequence_rewards(policy, adapter_name, self.head, texts, max_length)

    return RewardNet()
