"""GRPO: G completions per prompt, advantages relative to the group, no critic (Shao et al. 2024).

    policy     the `policy` adapter (from SFT), trained here
    reference  a frozen copy of the SFT `policy` adapter; KL(policy || reference) enters the loss (k3), not the reward
    reward     the reward stage's model (or any reward_models kind), as in PPO

Rollouts, scoring, the reference, the sync check, logging and checkpoints are PPO's (stages/online.py); only
steps 3 and 4 differ. RLOO (stages/rloo.py) is this loop with a leave-one-out baseline.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from alignment.stage import StageContext, StageResult
from stages.online import (
    Minibatches,
    OnlineConfig,
    OnlineRun,
    average_gradients,
    pack,
    requires,
    token_logprobs,
    unshuffle,
)


class GroupConfig(OnlineConfig):
    """Fields of the critic-free group stages (GRPO, RLOO)."""

    group_size: int = Field(4, ge=2)  # completions sampled per prompt
    batch_size: int = Field(8, ge=1)  # prompts per iteration: batch_size * group_size completions
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_coef: float = Field(0.05, ge=0.0)  # weight of KL(policy || reference) in the loss; 0 drops the reference pass


class GRPOConfig(GroupConfig):
    kind: Literal["grpo"] = "grpo"
    scale_rewards: bool = True  # divide by the group's std (False: Dr. GRPO's unscaled advantages)


class GRPOStage:
    """GRPO: group-relative advantages, clipped surrogate, KL to the frozen SFT policy in the loss, no critic."""

    Config = GRPOConfig

    def __init__(self, config: GRPOConfig):
        self.config = config

    @classmethod
    def requires(cls, config: GRPOConfig) -> set[str]:
        return requires(config)

    @classmethod
    def produces(cls, config: GRPOConfig) -> set[str]:
        return {"policy"}

    def advantages(self, scores):
        """(B,) sequence scores grouped by prompt -> (B,) advantages."""
        from alignment.algorithms.group import grpo_advantages

        return grpo_advantages(scores, self.config.group_size, scale=self.config.scale_rewards)

    def run(self, ctx: StageContext) -> StageResult:
        import torch

        from alignment.algorithms.ppo import kl_estimate, masked_mean, policy_loss

        cfg = self.config
        run = OnlineRun(ctx, cfg)  # trainable `policy`, frozen SFT `reference`, reward model
        policy = run.policy  # ctx.policy, or frozen copies around it for a method that trains base weights
        run.start_engine()
        params = run.policy_parameters
        optimizer = run.policy_optimizer()  # grouped by depth with layer_lr_decay / unfreeze_every
        G = cfg.group_size
        first, _ = run.resume(("policy",), {}, {"policy": optimizer})
        if first > 1:
            run.sync()  # the engine samples from the restored policy

        for iteration in range(first, cfg.iterations + 1):
            # 1. rollout: G completions for each prompt of the batch (a prompt's completions are adjacent)
            prompts = run.next_prompts(cfg.batch_size)
            rollout = run.generate([p for p in prompts for _ in range(G)])

            # 2. score; log-probs of the policy that sampled and of the reference
            raw_scores, scores, finished = run.score(rollout)
            seq = pack(rollout, policy.tokenizer.pad_token_id, policy.base.device)
            mask = seq["response_mask"]
            loop = Minibatches(len(rollout.prompts), cfg.ppo_epochs, cfg.minibatch_size, cfg.target_kl)
            with torch.no_grad():  # one pass over one minibatch: its own forward gives the old log-probs (step 4)
                old_logprobs = None if loop.single else token_logprobs(policy, "policy", seq, cfg.temperature)[0]
                ref_logprobs = token_logprobs(policy, "reference", seq, cfg.temperature)[0] if cfg.kl_coef else None

            # 3. advantages relative to the group, one per completion, the same for each of its tokens
            advantages = self.advantages(scores).to(mask.device)[:, None] * mask

            # 4. K epochs x minibatches: clipped surrogate + kl_coef * KL(policy || reference), early stop on approx_kl
            t0 = time.time()
            with policy.checkpointing(cfg.gradient_checkpointing):  # recompute activations in backward
                for mb in loop:
                    sub = {k: v[mb] for k, v in seq.items()}
                    m = mask[mb]
                    with policy.using("policy"):
                        logprobs, entropy = token_logprobs(policy, "policy", sub, cfg.temperature, with_entropy=True)
                        if loop.single:  # before any update: these are the log-probs of the policy that sampled
                            old_logprobs = unshuffle(logprobs, mb)
                        pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[mb], advantages[mb], m, cfg.clip_range)
                        kl_loss = (masked_mean(kl_estimate(logprobs, ref_logprobs[mb], cfg.kl_estimator), m)
                                   if cfg.kl_coef else logprobs.new_zeros(()))
                        mean_entropy = masked_mean(entropy, m)
                        (pg_loss + cfg.kl_coef * kl_loss - cfg.entropy_coef * mean_entropy).backward()
                    run.schedule.hold(iteration)  # progressive unfreezing: groups not yet unfrozen stay still
                    average_gradients(params)  # data parallel: the mean over the ranks
                    run.check_gradients(iteration, torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    loop.record(pg_loss=pg_loss.item(), kl_loss=kl_loss.item(), clipfrac=pg_stats["clipfrac"],
                                approx_kl=pg_stats["approx_kl"], entropy=mean_entropy.item())
            run.timing["train"] += time.time() - t0
            run.sync()

            # 5. log
            groups = raw_scores.view(-1, G)
            kl = kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator) if cfg.kl_coef else torch.zeros_like(mask)
            kl_per_seq = (kl * mask).sum(1).mean().item()
            metrics = {
                "reward": raw_scores.mean().item(),
                "reward_normalized": scores.mean().item(),
                "reward_std_in_group": groups.std(dim=1).mean().item(),
                "groups_without_signal": (groups.std(dim=1) < 1e-6).float().mean().item(),
                "kl": kl_per_seq,
                **loop.means(),
                "response_length": mask.sum(1).float().mean().item(),
                "finished": finished.mean().item(),
                "early_stopped": float(loop.stopped),
            }
            run.log(iteration, metrics, rollout, old_logprobs, mask)
            run.checkpoint(iteration, ("policy",), {}, {"policy": optimizer})

        final = {"reward": round(raw_scores.mean().item(), 4), "kl": round(kl_per_seq, 4)}
        metrics, artifacts = run.finish(final)
        return run.result(metrics, artifacts)
