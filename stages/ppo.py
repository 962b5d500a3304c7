"""PPO on one shared base: policy, reference, critic and reward model are named adapters on the same weights.

    policy     the `policy` adapter (from SFT), trained here
    reference  a frozen copy of the SFT `policy` adapter (not the bare base)
    critic     a fresh `value` adapter + a linear value head
    reward     the reward stage's `reward` adapter + score head (or any reward_models kind)

The loop reads top to bottom like CleanRL's ppo.py; the maths are in alignment/algorithms/.
"""

from __future__ import annotations

import random
import time
from typing import ClassVar, Literal

from pydantic import Field

from alignment.config import DataSource, StageConfig
from alignment.stage import StageContext, StageResult


class PPOConfig(StageConfig):
    uses_rollout: ClassVar[bool] = True

    kind: Literal["ppo"] = "ppo"
    prompts: DataSource = "toy:prompts"  # rows with a `prompt` column (chat `messages` are rendered with the template)
    columns: dict[str, str] = Field(default_factory=dict)
    reward: str = "trained"  # trained (the reward stage's model) | toy_gold | package.module:function
    reward_normalization: Literal["fixed", "running", "none"] = "fixed"  # fixed: the reward model's training stats
    reward_clip: float | None = Field(5.0, gt=0)
    unfinished_penalty: float = Field(1.0, ge=0.0)  # subtracted from the score of responses that never end
    iterations: int = Field(60, ge=1)
    batch_size: int = Field(32, ge=1)  # prompts (= samples) per iteration
    minibatch_size: int = Field(16, ge=1)
    ppo_epochs: int = Field(2, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    value_learning_rate: float = Field(1e-3, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    clip_range: float = Field(0.2, gt=0)
    value_clip_range: float | None = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, gt=0)
    entropy_coef: float = Field(0.0, ge=0.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    kl_coef: float = Field(0.05, ge=0.0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl_target: float | None = Field(None, gt=0)  # set to adapt kl_coef towards this KL per sequence
    target_kl: float | None = Field(0.1, gt=0)  # early-stop the epochs when approx_kl exceeds it
    whiten_advantages: bool = True
    max_new_tokens: int = Field(24, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    gold_eval_every: int = Field(10, ge=1)  # toy only
    sync_check_every: int = Field(5, ge=1)
    sync_warn_threshold: float = Field(0.1, gt=0)  # mean |logprob diff| per token that triggers a warning
    checkpoint_every: int = Field(20, ge=1)


class PPOStage:
    """PPO (clipped, GAE, KL to the frozen SFT policy) with rollouts from a RolloutEngine."""

    Config = PPOConfig

    def __init__(self, config: PPOConfig):
        self.config = config

    @classmethod
    def requires(cls, config: PPOConfig) -> set[str]:
        return {"policy", "reward_model"} if config.reward == "trained" else {"policy"}

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
        from alignment.data import load_rows
        from alignment.metrics import console
        from alignment.rollout import Sampling
        from reward_models.trained import new_score_head

        cfg, policy = self.config, ctx.policy
        prompts = self._prompts(ctx, load_rows(cfg.prompts, cfg.columns, f"stages.{ctx.index}.prompts"))
        policy.load_adapter("policy", ctx.artifact("policy"), trainable=True)
        policy.freeze_copy("policy", "reference")
        policy.add_adapter("value", ctx.adapter)
        value_head = new_score_head(policy.base.config.hidden_size, policy.base.dtype, policy.base.device)
        torch.nn.init.zeros_(value_head.weight)
        reward_model, normalized = self._reward_model(ctx)
        engine = self._engine(ctx)
        console.print(f"rollout engine: {engine.name} (sync: {engine.sync_mode})")
        sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        policy_params = [p for n, p in policy.model.named_parameters() if ".policy." in n]
        value_params = [p for n, p in policy.model.named_parameters() if ".value." in n] + list(value_head.parameters())
        policy_opt = torch.optim.AdamW(policy_params, lr=cfg.learning_rate)
        value_opt = torch.optim.AdamW(value_params, lr=cfg.value_learning_rate)
        kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl_target, 10_000) if cfg.adaptive_kl_target else None
        kl_coef = cfg.kl_coef
        rng = random.Random(ctx.seed)
        order: list[int] = []
        timing = {"generate": 0.0, "score": 0.0, "train": 0.0, "sync": 0.0}
        sync_diffs: list[tuple[float, float]] = []
        gold: dict = {}
        samples, loop_start = 0, time.time()

        for iteration in range(1, cfg.iterations + 1):
            # 1. rollout: sample a response for each prompt of the batch
            if len(order) < cfg.batch_size:
                order += rng.sample(range(len(prompts)), len(prompts))
            batch_prompts = [prompts[i] for i in order[: cfg.batch_size]]
            order = order[cfg.batch_size :]
            t0 = time.time()
            rollout = engine.generate(batch_prompts, sampling)
            t1 = time.time()
            timing["generate"] += t1 - t0

            # 2. score the responses; log-probs of policy and reference, values of the critic
            raw_scores = reward_model.score(rollout.prompts, rollout.texts).float()
            scores = normalized.normalize(raw_scores)
            finished = torch.tensor(rollout.finished, dtype=torch.float32)
            scores = scores - cfg.unfinished_penalty * (1 - finished)
            seq = _pack(rollout, policy.tokenizer.pad_token_id, policy.base.device)
            mask = seq["response_mask"]
            with torch.no_grad():
                old_logprobs, _ = _logprobs(policy, "policy", seq, cfg.temperature)
                ref_logprobs, _ = _logprobs(policy, "reference", seq, cfg.temperature)
                old_values = _values(policy, value_head, seq)
            timing["score"] += time.time() - t1

            # 3. KL-shaped per-token rewards
            kl = kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator)
            rewards = kl_shaped_rewards(scores.to(kl.device), kl, mask, kl_coef)

            # 4. advantages and returns (GAE)
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask)

            # 5. K epochs x minibatches of clipped policy and value losses (early stop on approx_kl)
            t2 = time.time()
            stats: dict[str, list[float]] = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": [], "entropy": []}
            stop = False
            for _ in range(cfg.ppo_epochs):
                for mb in torch.randperm(len(batch_prompts)).split(cfg.minibatch_size):
                    sub = {k: v[mb] for k, v in seq.items()}
                    m = mask[mb]
                    # backward inside `using`: gradients only reach adapters that still require them
                    with policy.using("policy"):
                        logprobs, entropy = _logprobs(policy, "policy", sub, cfg.temperature, with_entropy=True)
                        pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[mb], advantages[mb], m, cfg.clip_range)
                        mean_entropy = masked_mean(entropy, m)
                        (pg_loss - cfg.entropy_coef * mean_entropy).backward()
                    with policy.using("value"):
                        values = _values(policy, value_head, sub, grad=True)
                        vf_loss, _ = value_loss(values, old_values[mb], returns[mb], m, cfg.value_clip_range)
                        (cfg.vf_coef * vf_loss).backward()
                    torch.nn.utils.clip_grad_norm_(policy_params, cfg.max_grad_norm)
                    torch.nn.utils.clip_grad_norm_(value_params, cfg.max_grad_norm)
                    policy_opt.step()
                    value_opt.step()
                    policy_opt.zero_grad(set_to_none=True)
                    value_opt.zero_grad(set_to_none=True)
                    for k, v in (("pg_loss", pg_loss.item()), ("vf_loss", vf_loss.item()), ("entropy", mean_entropy.item()),
                                 ("clipfrac", pg_stats["clipfrac"]), ("approx_kl", pg_stats["approx_kl"])):
                        stats[k].append(v)
                    if cfg.target_kl is not None and pg_stats["approx_kl"] > cfg.target_kl:
                        stop = True
                        break
                if stop:
                    break
            timing["train"] += time.time() - t2
            timing["sync"] += engine.sync(policy)
            samples += len(batch_prompts)
            kl_per_seq = (kl * mask).sum(1).mean().item()
            if kl_ctl:
                kl_coef = kl_ctl.update(kl_per_seq, len(batch_prompts))

            # 6. log
            metrics = {
                "reward": raw_scores.mean().item(),
                "reward_normalized": scores.mean().item(),
                "kl": kl_per_seq,
                "kl_coef": kl_coef,
                "entropy": sum(stats["entropy"]) / len(stats["entropy"]),
                "approx_kl": sum(stats["approx_kl"]) / len(stats["approx_kl"]),
                "clipfrac": sum(stats["clipfrac"]) / len(stats["clipfrac"]),
                "pg_loss": sum(stats["pg_loss"]) / len(stats["pg_loss"]),
                "vf_loss": sum(stats["vf_loss"]) / len(stats["vf_loss"]),
                "explained_variance": explained_variance(old_values, returns, mask),
                "response_length": mask.sum(1).float().mean().item(),
                "finished": finished.mean().item(),
                "early_stopped": float(stop),
                **{f"time_{k}": round(v, 3) for k, v in timing.items()},
            }
            if iteration % cfg.sync_check_every == 0 or iteration == 1:
                diff = _sync_diff(rollout, old_logprobs, mask)
                if diff is not None:
                    sync_diffs.append(diff)
                    metrics.update(sync_logprob_diff_mean=diff[0], sync_logprob_diff_max=diff[1])
                    if diff[0] > cfg.sync_warn_threshold:
                        console.print(f"[yellow]warning:[/yellow] engine and trainer log-probs differ by {diff[0]:.3f} "
                                      "nats/token: a stale policy, a template or a dtype mismatch?")
            if ctx.is_toy and (iteration % cfg.gold_eval_every == 0 or iteration == cfg.iterations):
                with policy.using("policy"):
                    gold = ctx.gold_metrics()
                metrics.update(gold)
            ctx.logger.log(iteration, {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})
            if iteration % cfg.checkpoint_every == 0:
                self._checkpoint(ctx, iteration, value_head, policy_opt, value_opt)

        wall = time.time() - loop_start
        policy_dir, value_dir = ctx.dir / "adapters" / "policy", ctx.dir / "adapters" / "value"
        policy.save_adapter("policy", policy_dir)
        policy.save_adapter("value", value_dir)
        from safetensors.torch import save_file

        save_file({"weight": value_head.weight.detach().contiguous()}, str(value_dir / "value_head.safetensors"))
        result = {
            "reward": round(raw_scores.mean().item(), 4),
            "kl": round(kl_per_seq, 4),
            "samples_per_s": round(samples / wall, 3),
            "sync_logprob_diff_mean": round(sum(d[0] for d in sync_diffs) / len(sync_diffs), 7) if sync_diffs else None,
            "sync_logprob_diff_max": round(max(d[1] for d in sync_diffs), 7) if sync_diffs else None,
            **{f"time_{k}_s": round(v, 2) for k, v in timing.items()},
            **gold,
        }
        if hasattr(engine, "close"):
            engine.close()
        for name in ("reference", "value"):
            policy.delete_adapter(name)
        policy.activate("policy")
        return StageResult(
            metrics=result,
            artifacts={"policy": ctx.relative(policy_dir), "value": ctx.relative(value_dir)},
            info={"engine": engine.name, "sync_mode": engine.sync_mode},
        )

    # ----------------------------------------------------------------------------------------------- parts

    def _prompts(self, ctx: StageContext, rows: list[dict]) -> list[str]:
        from alignment.errors import UserError

        if "prompt" in rows[0]:
            return [str(r["prompt"]) for r in rows]
        if "messages" in rows[0]:
            tok = ctx.policy.tokenizer
            return [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
        raise UserError(f"stages.{ctx.index}.prompts: {self.config.prompts!r} needs a `prompt` or `messages` column; "
                        f"columns found: {', '.join(sorted(rows[0]))}")

    def _reward_model(self, ctx: StageContext):
        """The scorer, and it wrapped in normalisation: fixed from the reward model's training statistics when it
        has them (else running), running, or none (clipping only)."""
        from reward_models import Normalized, RuleReward, ToyGoldReward
        from reward_models.trained import TrainedRewardModel

        cfg = self.config
        if cfg.reward == "trained":
            model = TrainedRewardModel.load(ctx.artifact("reward_model"), policy=ctx.policy)
        elif cfg.reward == "toy_gold":
            model = ToyGoldReward()
        else:
            model = RuleReward(cfg.reward)
        stats = getattr(model, "stats", None) or {}
        if cfg.reward_normalization == "none":
            return model, Normalized(model, mean=0.0, std=1.0, clip=cfg.reward_clip)
        if cfg.reward_normalization == "fixed" and stats:
            return model, Normalized(model, mean=stats["mean"], std=stats["std"], clip=cfg.reward_clip)
        if cfg.reward_normalization == "fixed":
            from alignment.metrics import console

            console.print(f"reward_normalization fixed: the {cfg.reward!r} reward has no training statistics; "
                          "normalising with running statistics instead")
        return model, Normalized(model, clip=cfg.reward_clip)

    def _engine(self, ctx: StageContext):
        """`auto` takes vLLM when it is installed and supports the model, else HF, and says which and why."""
        from alignment.metrics import console
        from alignment.rollout.hf import HFEngine
        from alignment.rollout.vllm import VLLMEngine, vllm_problem

        choice, policy = ctx.rollout.engine, ctx.policy
        if choice == "hf":
            return HFEngine(policy)
        if choice == "auto":
            problem = vllm_problem(policy.base.config)
            if problem:
                console.print(f"rollout.engine auto: using the HF engine ({problem})")
                return HFEngine(policy)
        max_len = min(getattr(policy.base.config, "max_position_embeddings", 4096), 4096)
        return VLLMEngine(policy, ctx.rollout.sync, ctx.rollout.memory_fraction, ctx.adapter.r, max_len, ctx.seed)

    def _checkpoint(self, ctx, iteration, value_head, policy_opt, value_opt) -> None:
        import torch

        from alignment.io import atomic_write_json

        folder = ctx.dir / "checkpoints" / f"iter-{iteration:05d}"
        ctx.policy.save_adapter("policy", folder / "policy")
        ctx.policy.save_adapter("value", folder / "value")
        from safetensors.torch import save_file

        save_file({"weight": value_head.weight.detach().contiguous()}, str(folder / "value_head.safetensors"))
        torch.save(
            {
                "policy_optimizer": policy_opt.state_dict(),
                "value_optimizer": value_opt.state_dict(),
                "python_rng": random.getstate(),
                "torch_rng": torch.get_rng_state(),
            },
            folder / "state.pt",
        )
        atomic_write_json(folder / "state.json", {"iteration": iteration})


# ------------------------------------------------------------------------------------------ tensor helpers


def _pack(rollout, pad_id: int, device):
    """Right-padded prompt+response ids and, per response token, the index of the logit that predicts it.

    Returns input_ids, attention_mask (B, L); response_ids, positions, response_mask (B, T).
    """
    import torch

    full = [p + r for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
    L = max(len(x) for x in full)
    T = max(1, max(len(r) for r in rollout.response_ids))
    B = len(full)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    response_ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(rollout.prompt_ids, rollout.response_ids)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention[i, : len(p) + len(r)] = 1
        response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        positions[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        response_mask[i, : len(r)] = 1
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=attention, response_ids=response_ids,
                                              positions=positions, response_mask=response_mask).items()}


def _logprobs(policy, adapter: str, seq, temperature: float, with_entropy: bool = False):
    """(B, T) log-probs of the response tokens (logits / temperature, as sampled) with ``adapter`` active."""
    import torch

    with policy.using(adapter) as model:
        logits = model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"]).logits
    index = seq["positions"][:, :, None].expand(-1, -1, logits.shape[-1])
    logits = logits.gather(1, index).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, seq["response_ids"][:, :, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return token_logp, entropy


def _values(policy, head, seq, grad: bool = False):
    """(B, T) critic values of the state before each response token (the `value` adapter + head)."""
    import torch

    with torch.set_grad_enabled(grad), policy.using("value"):
        hidden = policy.backbone()(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"]).last_hidden_state
    index = seq["positions"][:, :, None].expand(-1, -1, hidden.shape[-1])
    with torch.set_grad_enabled(grad):
        return head(hidden.gather(1, index)).squeeze(-1).float()


def _sync_diff(rollout, trainer_logprobs, mask) -> tuple[float, float] | None:
    """Mean and max |engine log-prob - trainer log-prob| over the sampled tokens, if the engine returned any."""
    import torch

    if not rollout.logprobs:
        return None
    engine = torch.zeros_like(trainer_logprobs)
    for i, row in enumerate(rollout.logprobs):
        engine[i, : len(row)] = torch.tensor(row, dtype=engine.dtype)
    diff = (engine - trainer_logprobs).abs() * mask
    return (diff.sum() / mask.sum().clamp(min=1)).item(), diff.max().item()
