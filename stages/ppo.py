"""PPO on one shared base: policy, reference, critic and reward model are named adapters on the same weights.

    policy     the `policy` adapter (from SFT), trained here
    reference  a frozen copy of the SFT `policy` adapter (not the bare base)
    critic     a fresh `value` adapter + a linear value head (`critic: separate`), or a value head on the policy's
               own last hidden state (`critic: shared`: one forward/backward trains both, as TRL's former
               AutoModelForCausalLMWithValueHead; the value loss then also moves the policy adapter)
    reward     the reward stage's `reward` adapter + score head (or any reward_models kind)

The loop reads top to bottom like CleanRL's ppo.py; the maths are in alignment/algorithms/.
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


class PPOConfig(OnlineConfig):
    kind: Literal["ppo"] = "ppo"
    value_learning_rate: float = Field(1e-3, gt=0)
    value_clip_range: float | None = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, gt=0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    adaptive_kl_target: float | None = Field(None, gt=0)  # set to adapt kl_coef towards this KL per sequence
    whiten_advantages: bool = True
    critic: Literal["separate", "shared"] = "separate"  # shared: 4-5 forward-pass equivalents per batch instead of 8-9


class PPOStage:
    """PPO (clipped, GAE, KL to the frozen SFT policy) with rollouts from a RolloutEngine."""

    Config = PPOConfig

    def __init__(self, config: PPOConfig):
        self.config = config

    @classmethod
    def requires(cls, config: PPOConfig) -> set[str]:
        return requires(config)

    @classmethod
    def produces(cls, config: PPOConfig) -> set[str]:
        return {"policy", "value"}

    def run(self, ctx: StageContext) -> StageResult:
        import torch

        from alignment.algorithms.gae import gae
        from alignment.algorithms.ppo import (
            AdaptiveKLController,
            explained_variance,
            kl_estimate,
            kl_shaped_rewards,
            masked_mean,
            masked_whiten,
            policy_loss,
            value_loss,
        )
        from reward_models.trained import new_score_head

        cfg = self.config
        run = OnlineRun(ctx, cfg)  # trainable `policy`, frozen SFT `reference`, reward model
        policy = run.policy  # ctx.policy, or frozen copies around it for a method that trains base weights
        shared = cfg.critic == "shared"
        trained = ("policy",) if shared else ("policy", "value")  # adapters saved in checkpoints
        if not shared:
            policy.add_adapter("value", ctx.adapter)
        value_head = new_score_head(policy.base.config.hidden_size, policy.base.dtype, policy.base.device)
        torch.nn.init.zeros_(value_head.weight)
        run.start_engine()
        policy_params = run.policy_parameters
        value_params = [] if shared else [p for n, p in policy.model.named_parameters() if ".value." in n]
        value_params += list(value_head.parameters())
        policy_opt = run.policy_optimizer()  # grouped by depth with layer_lr_decay / unfreeze_every
        value_opt = torch.optim.AdamW(value_params, lr=cfg.value_learning_rate)
        kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl_target, 10_000) if cfg.adaptive_kl_target else None
        kl_coef = cfg.kl_coef
        optimizers = {"policy": policy_opt, "value": value_opt}
        first, extra = run.resume(trained, {"value_head": value_head.weight}, optimizers)
        kl_coef = extra.get("kl_coef", kl_coef)
        if kl_ctl and "kl_coef" in extra:
            kl_ctl.value = kl_coef
        if first > 1:
            run.sync()  # the engine samples from the restored policy

        for iteration in range(first, cfg.iterations + 1):
            # 1. rollout: sample a response for each prompt of the batch
            rollout = run.generate(run.next_prompts(cfg.batch_size))

            # 2. score the responses; log-probs of policy and reference, values of the critic
            raw_scores, scores, finished = run.score(rollout)
            seq = pack(rollout, policy.tokenizer.pad_token_id, policy.base.device)
            mask = seq["response_mask"]
            loop = Minibatches(len(rollout.prompts), cfg.ppo_epochs, cfg.minibatch_size, cfg.target_kl)
            with torch.no_grad():
                ref_logprobs, _ = token_logprobs(policy, "reference", seq, cfg.temperature)
                if not shared:
                    old_values = _values(policy, value_head, seq)
                if not loop.single:  # one pass over one minibatch: the training forward gives these (step 5)
                    old_logprobs, _, *hidden = token_logprobs(policy, "policy", seq, cfg.temperature,
                                                              with_hidden=shared)
                    if shared:
                        old_values = _head_values(value_head, hidden[0])

            def advantages_returns(old_logprobs):
                # 3. KL-shaped per-token rewards
                kl = kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator)
                rewards = kl_shaped_rewards(scores.to(kl.device), kl, mask, kl_coef)
                # 4. advantages and returns (GAE)
                advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                return kl, (masked_whiten(advantages, mask) if cfg.whiten_advantages else advantages), returns

            if not loop.single:
                kl, advantages, returns = advantages_returns(old_logprobs)

            # 5. K epochs x minibatches of clipped policy and value losses (early stop on approx_kl)
            t0 = time.time()
            with policy.checkpointing(cfg.gradient_checkpointing):  # recompute activations in backward
                for mb in loop:
                    sub = {k: v[mb] for k, v in seq.items()}
                    m = mask[mb]
                    # backward inside `using`: gradients only reach adapters that still require them
                    with policy.using("policy"):
                        logprobs, entropy, *hidden = token_logprobs(policy, "policy", sub, cfg.temperature,
                                                                    with_entropy=True, with_hidden=shared)
                        values = _head_values(value_head, hidden[0], grad=True) if shared else None
                        if loop.single:  # before any update: the sampling policy's log-probs, so steps 3-4 run here
                            old_logprobs = unshuffle(logprobs, mb)
                            if shared:
                                old_values = unshuffle(values, mb)
                            kl, advantages, returns = advantages_returns(old_logprobs)
                        pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[mb], advantages[mb], m, cfg.clip_range)
                        mean_entropy = masked_mean(entropy, m)
                        loss = pg_loss - cfg.entropy_coef * mean_entropy
                        if shared:  # one backward through the shared trunk
                            vf_loss, _ = value_loss(values, old_values[mb], returns[mb], m, cfg.value_clip_range)
                            loss = loss + cfg.vf_coef * vf_loss
                        loss.backward()
                    if not shared:
                        with policy.using("value"):
                            values = _values(policy, value_head, sub, grad=True)
                            vf_loss, _ = value_loss(values, old_values[mb], returns[mb], m, cfg.value_clip_range)
                            (cfg.vf_coef * vf_loss).backward()
                    run.schedule.hold(iteration)  # progressive unfreezing: groups not yet unfrozen stay still
                    average_gradients(policy_params + value_params)  # data parallel: the mean over the ranks
                    run.check_gradients(iteration, torch.nn.utils.clip_grad_norm_(policy_params, cfg.max_grad_norm))
                    run.check_gradients(iteration, torch.nn.utils.clip_grad_norm_(value_params, cfg.max_grad_norm))
                    policy_opt.step()
                    value_opt.step()
                    policy_opt.zero_grad(set_to_none=True)
                    value_opt.zero_grad(set_to_none=True)
                    loop.record(pg_loss=pg_loss.item(), vf_loss=vf_loss.item(), clipfrac=pg_stats["clipfrac"],
                                approx_kl=pg_stats["approx_kl"], entropy=mean_entropy.item())
            run.timing["train"] += time.time() - t0
            run.sync()
            kl_per_seq = (kl * mask).sum(1).mean().item()
            if kl_ctl:
                kl_coef = kl_ctl.update(kl_per_seq, len(rollout.prompts))

            # 6. log
            metrics = {
                "reward": raw_scores.mean().item(),
                "reward_normalized": scores.mean().item(),
                "kl": kl_per_seq,
                "kl_coef": kl_coef,
                **loop.means(),
                "explained_variance": explained_variance(old_values, returns, mask),
                "response_length": mask.sum(1).float().mean().item(),
                "finished": finished.mean().item(),
                "early_stopped": float(loop.stopped),
            }
            run.log(iteration, metrics, rollout, old_logprobs, mask)
            run.checkpoint(iteration, trained, {"value_head": value_head.weight}, optimizers,
                           {"kl_coef": kl_coef})

        from safetensors.torch import save_file

        from alignment.io import atomic_file

        final = {"reward": round(raw_scores.mean().item(), 4), "kl": round(kl_per_seq, 4)}
        metrics, artifacts = run.finish(final, extra_adapters=trained[1:])
        if shared:  # the critic is the policy adapter + this head
            folder = ctx.dir / "adapters" / "value"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "critic.json").write_text('{"critic": "shared", "trunk": "policy"}\n')
            artifacts["value"] = ctx.relative(folder)
        with atomic_file(ctx.run_dir / artifacts["value"] / "value_head.safetensors") as tmp:
            save_file({"weight": value_head.weight.detach().contiguous()}, str(tmp))
        return run.result(metrics, artifacts)


# ------------------------------------------------------------------------------------------ tensor helpers


def _values(policy, head, seq, grad: bool = False):
    """(B, T) critic values of the state before each response token (the `value` adapter + head)."""
    import torch

    with torch.set_grad_enabled(grad), policy.using("value"):
        hidden = policy.backbone()(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"],
                                   use_cache=False).last_hidden_state
    index = seq["positions"][:, :, None].expand(-1, -1, hidden.shape[-1])
    return _head_values(head, hidden.gather(1, index), grad)


def _head_values(head, hidden, grad: bool = False):
    """(B, T) values: the value head on (B, T, H) hidden states."""
    import torch

    with torch.set_grad_enabled(grad):
        return head(hidden).squeeze(-1).float()
