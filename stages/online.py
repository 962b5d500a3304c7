"""What the online stages (PPO, GRPO, RLOO) share: config fields, the rollout engine, the reward, the frozen SFT
reference, log-probs over packed sequences, the sync check, logging, checkpoints and the final metrics.

Each stage keeps its own loop (numbered steps, CleanRL style) and calls these parts; only the advantage and the
loss differ between them.
"""

from __future__ import annotations

import random
import time
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from alignment.config import DataSource, StageConfig
from alignment.stage import StageContext, StageResult


class OnlineConfig(StageConfig):
    """Fields every online stage has (PPO, GRPO, RLOO)."""

    uses_rollout: ClassVar[bool] = True

    prompts: DataSource = "toy:prompts"  # rows with a `prompt` column (chat `messages` are rendered with the template)
    columns: dict[str, str] = Field(default_factory=dict)
    reward: str = "trained"  # trained (the reward stage's model) | toy_gold | package.module:function
    reward_normalization: Literal["fixed", "running", "none"] = "fixed"  # fixed: the reward model's training stats
    reward_clip: float | None = Field(5.0, gt=0)
    unfinished_penalty: float = Field(1.0, ge=0.0)  # subtracted from the score of responses that never end
    iterations: int = Field(60, ge=1)
    batch_size: int = Field(32, ge=1)  # prompts per iteration
    minibatch_size: int = Field(16, ge=1)  # completions per optimiser step
    ppo_epochs: int = Field(2, ge=1)  # optimisation passes over each batch (TRL: num_iterations)
    learning_rate: float = Field(5e-4, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    layer_lr_decay: float | None = Field(None, gt=0.0, le=1.0)  # LLRD of the policy (alignment/schedules.py)
    unfreeze_every: int | None = Field(None, ge=1)  # progressive unfreezing of the policy: one more group every N iterations
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, more compute (TRL's default)
    clip_range: float = Field(0.2, gt=0)
    entropy_coef: float = Field(0.0, ge=0.0)
    kl_coef: float = Field(0.05, ge=0.0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    target_kl: float | None = Field(0.1, gt=0)  # early-stop the epochs when approx_kl exceeds it
    max_new_tokens: int = Field(24, ge=1)
    # prompts are cut from the left (start token and most recent text kept) to this many tokens, and always to the
    # model's context (max_position_embeddings) minus max_new_tokens; None: only the latter
    max_prompt_length: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)  # only 1.0: see _full_distribution
    gold_eval_every: int = Field(10, ge=1)  # toy only
    sync_check_every: int = Field(5, ge=1)
    sync_warn_threshold: float = Field(0.1, gt=0)  # mean |logprob diff| per token that triggers a warning
    checkpoint_every: int = Field(20, ge=1)

    @field_validator("top_p")
    @classmethod
    def _full_distribution(cls, value: float) -> float:
        """The trainer's log-probs, ratio and KL are those of the full softmax (logits / temperature); nucleus
        sampling would draw from a truncated one, and every update would be off-policy. Refused, not approximated."""
        if value < 1.0:
            from pydantic_core import PydanticCustomError

            raise PydanticCustomError(
                "top_p_truncates",
                "top_p below 1 samples from a truncated distribution, but the trainer's log-probs, ratio and KL are "
                "those of the full one (off-policy updates); remove `top_p` (or set 1.0), lower `temperature` for "
                "less random samples")
        return value


class OnlineRun:
    """One online stage's moving parts: trainable `policy`, frozen `reference` (the SFT policy), reward, engine.

    The stage calls, per iteration: ``next_prompts`` -> ``generate`` -> ``score`` -> (its own maths) -> ``sync`` ->
    ``log``; at the end ``finish``.
    """

    def __init__(self, ctx: StageContext, cfg: OnlineConfig):
        from alignment import distributed
        from alignment.data import load_rows
        from alignment.methods import online_policy

        self.ctx, self.cfg, self.policy = ctx, cfg, ctx.policy
        rows = load_rows(cfg.prompts, cfg.columns, f"stages.{ctx.index}.prompts")
        self.prompts, self.prompts_cut = self._fit_prompts(self._prompt_texts(rows))
        self.policy = online_policy(ctx)  # `policy` + frozen `reference` (copies for base-weight / module methods)
        self.policy.model.eval()  # a trainer earlier in this process leaves training mode on; checkpointing is ours
        self.reward_model, self.normalized = self._reward_model()
        self.engine = None  # started by start_engine(), after the stage has added its own adapters
        self.rng = random.Random(ctx.seed)
        self.order: list[int] = []
        self.timing = {"generate": 0.0, "score": 0.0, "train": 0.0, "sync": 0.0}
        self.sync_diffs: list[tuple[float, float]] = []
        self.gold: dict = {}
        self.samples = 0
        self.iteration = 0
        self.seen_prompts: list[int] = []  # indices this process trained on (data-parallel report)

    @property
    def policy_parameters(self) -> list:
        return self.policy.adapter_parameters("policy")

    def policy_optimizer(self):
        """The policy's AdamW; with `layer_lr_decay` / `unfreeze_every` grouped by depth (``self.schedule.hold``
        then keeps the groups not yet unfrozen still)."""
        from alignment.methods import num_layers
        from alignment.schedules import OnlineSchedule

        params = self.policy_parameters
        ids = {id(p) for p in params}
        model = self.policy.named_model("policy") if hasattr(self.policy, "named_model") else self.policy.model
        named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
        self.schedule = OnlineSchedule(self.cfg, named, num_layers(self.policy.base), params)
        return self.schedule.optimizer(self.cfg.learning_rate)

    def start_engine(self) -> None:
        from alignment.metrics import console
        from alignment.rollout import Sampling

        self.engine = make_engine(self.ctx, self.policy)
        console.print(f"rollout engine: {self.engine.name} (sync: {self.engine.sync_mode})")
        self.sampling = Sampling(self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p)
        self.start_time = time.time()  # samples_per_s leaves out the set-up and the engine start

    # ------------------------------------------------------------------------------------------- per iteration

    def next_prompts(self, n: int) -> list[str]:
        """The next ``n`` prompts of a seeded shuffle, reshuffled each pass over the data. Under ``accelerate launch``
        every rank draws the same ``n`` x world block and takes its own share (``n`` is per process)."""
        from alignment import distributed

        world, rank = distributed.world_size(), distributed.rank()
        while len(self.order) < n * world:
            self.order += self.rng.sample(range(len(self.prompts)), len(self.prompts))
        block, self.order = self.order[: n * world], self.order[n * world :]
        self.seen_prompts.extend(block[rank::world])
        return [self.prompts[i] for i in block[rank::world]]

    def generate(self, prompts: list[str]):
        """One rollout per iteration. Each request gets its own sampling seed from (run seed, iteration, its place in
        the global batch): vLLM's sampler state is not in a checkpoint, and this makes it unnecessary."""
        from alignment import distributed
        from alignment.rollout import request_seed

        t0 = time.time()
        first = distributed.rank() * len(prompts)
        seeds = [request_seed(self.ctx.seed, self.iteration + 1, first + i) for i in range(len(prompts))]
        rollout = self.engine.generate(prompts, self.sampling, seeds)
        self.engine.sleep()  # vLLM on a GPU with `rollout.sleep`: the card is the trainer's until the next sync
        self.iteration += 1  # one rollout per iteration (named in non-finite errors)
        self.timing["generate"] += time.time() - t0
        self.samples += len(prompts)
        return rollout

    def score(self, rollout):
        """(raw scores (B,), normalised scores minus the unfinished penalty (B,), finished (B,))."""
        import torch

        from alignment.guards import check_finite

        t0 = time.time()
        raw = self.reward_model.score(rollout.prompts, rollout.texts).float()
        check_finite(self.ctx.label, self.iteration, reward=raw)
        finished = torch.tensor(rollout.finished, dtype=torch.float32, device=raw.device)  # a plugin may score on a GPU
        scores = self.normalized.normalize(raw) - self.cfg.unfinished_penalty * (1 - finished)
        self.timing["score"] += time.time() - t0
        return raw, scores, finished

    def sync(self) -> None:
        self.timing["sync"] += self.engine.sync(self.policy)

    def log(self, iteration: int, metrics: dict, rollout, old_logprobs, mask) -> None:
        """Adds the sync check (every ``sync_check_every``), the toy gold reward (every ``gold_eval_every``) and the
        time split, then writes one line of metrics."""
        from alignment.metrics import console

        cfg = self.cfg
        metrics.update({f"time_{k}": round(v, 3) for k, v in self.timing.items()})
        if iteration % cfg.sync_check_every == 0 or iteration == 1:
            diff = sync_diff(rollout, old_logprobs, mask)
            if diff is not None:
                self.sync_diffs.append(diff)
                metrics.update(sync_logprob_diff_mean=diff[0], sync_logprob_diff_max=diff[1])
                if diff[0] > cfg.sync_warn_threshold:
                    console.print(f"[yellow]warning:[/yellow] engine and trainer log-probs differ by {diff[0]:.3f} "
                                  "nats/token: a stale policy, a template or a dtype mismatch?")
        if self.ctx.is_toy and (iteration % cfg.gold_eval_every == 0 or iteration == cfg.iterations):
            with self.policy.using("policy") as model:
                self.gold = self.ctx.gold_metrics(model=model)
            metrics.update(self.gold)
        self.ctx.logger.log(iteration, {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})

    # ----------------------------------------------------------------------------------------------- the end

    def _report_data_parallel(self) -> None:
        """Under ``accelerate launch``: each rank says which prompts it trained on and a checksum of its trainable
        weights, which must be equal on every rank (the gradients were averaged)."""
        import hashlib
        import sys

        from alignment import distributed

        if distributed.world_size() == 1:
            return
        digest = hashlib.sha1(str(self.seen_prompts).encode()).hexdigest()[:12]
        weights = sum(float(p.detach().double().sum()) for p in self.policy_parameters)
        print(f"rank {distributed.rank()}/{distributed.world_size()}: {self.cfg.kind} on {len(self.seen_prompts)} prompts "
              f"(digest {digest}, policy checksum {weights:.8f})", file=sys.stderr, flush=True)

    def finish(self, metrics: dict, extra_adapters: tuple[str, ...] = ()) -> tuple[dict, dict]:
        """Saves `policy` (and ``extra_adapters``), closes the engine, removes the reference; returns
        (final metrics, artifacts)."""
        wall = time.time() - self.start_time
        self._report_data_parallel()
        artifacts = {}
        for name in ("policy", *extra_adapters):
            folder = self.ctx.dir / "adapters" / name
            self.policy.save_adapter(name, folder)
            artifacts[name] = self.ctx.relative(folder)
        diffs = self.sync_diffs
        result = {
            **metrics,
            "samples_per_s": round(self.samples / wall, 3),
            "sync_logprob_diff_mean": round(sum(d[0] for d in diffs) / len(diffs), 7) if diffs else None,
            "sync_logprob_diff_max": round(max(d[1] for d in diffs), 7) if diffs else None,
            **{f"time_{k}_s": round(v, 2) for k, v in self.timing.items()},
            **self.gold,
            **({"long_prompts_truncated": self.prompts_cut} if self.prompts_cut else {}),
        }
        if hasattr(self.engine, "close"):
            self.engine.close()
        for name in ("reference", *extra_adapters):
            self.policy.delete_adapter(name)
        self.policy.activate("policy")
        return result, artifacts

    def result(self, metrics: dict, artifacts: dict) -> StageResult:
        return StageResult(metrics=metrics, artifacts=artifacts,
                           info={"engine": self.engine.name, "sync_mode": self.engine.sync_mode})

    def checkpoint(self, iteration: int, adapters: tuple[str, ...], tensors: dict, optimizers: dict,
                   extra: dict | None = None) -> None:
        """Every ``checkpoint_every`` iterations (and when Ctrl-C is pending): adapters, extra tensors, optimisers,
        RNG states, prompt order, counters and ``extra`` (alignment/checkpoint.py; safetensors + JSON, no pickle).
        Data parallel: rank 0 writes, with each rank's own state (running normaliser, RNGs, counters)."""
        from alignment import checkpoint

        if not checkpoint.due(self.ctx, iteration, self.cfg.checkpoint_every, self.cfg.iterations):
            return
        state = {
            "order_rng": checkpoint.python_rng_state(self.rng),
            "order": self.order,
            "samples": self.samples,
            "timing": self.timing,
            "sync_diffs": self.sync_diffs,
            "gold": self.gold,
            "normalizer": [self.normalized.mean, self.normalized.var, self.normalized.count],
            "seen_prompts": self.seen_prompts,
            "extra": extra or {},
        }
        adapters, tensors = self._checkpointed(adapters, tensors)
        checkpoint.write_stage_checkpoint(self.ctx, iteration, adapters, tensors, optimizers, state)

    def resume(self, adapters: tuple[str, ...], tensors: dict, optimizers: dict) -> tuple[int, dict]:
        """Restore what ``checkpoint`` saved from ``ctx.resume`` (adapters and ``tensors`` in place); returns (the
        first iteration to run, ``extra``). Without a checkpoint: (1, {})."""
        from alignment import checkpoint

        adapters, tensors = self._checkpointed(adapters, tensors)
        state = checkpoint.read_stage_checkpoint(self.ctx, adapters, tensors, optimizers)
        if state is None:
            return 1, {}
        checkpoint.set_python_rng_state(self.rng, state["order_rng"])
        self.order, self.samples, self.gold = state["order"], state["samples"], state["gold"]
        self.timing.update(state["timing"])
        self.sync_diffs = [tuple(d) for d in state["sync_diffs"]]
        self.normalized.mean, self.normalized.var, self.normalized.count = state["normalizer"]
        self.seen_prompts = state.get("seen_prompts", [])
        self.iteration = checkpoint.checkpoint_step(self.ctx.resume)
        return self.iteration + 1, state["extra"]

    def _checkpointed(self, adapters: tuple[str, ...], tensors: dict) -> tuple[tuple[str, ...], dict]:
        """A policy on a copy of the base of its own (``FrozenBasePolicy``) is no adapter of the shared base: its
        trainable tensors go into the checkpoint with the other tensors, and are restored in place as they are."""
        own = getattr(self.policy, "policy_tensors", None)
        if own is None or "policy" not in adapters:
            return adapters, tensors
        return tuple(a for a in adapters if a != "policy"), {**tensors, **own()}

    def check_gradients(self, iteration: int, norm) -> None:
        """Stops the stage on a NaN/inf gradient norm (before the optimiser step), logs spikes."""
        if not hasattr(self, "grad_monitor"):
            from alignment.guards import GradNormMonitor

            self.grad_monitor = GradNormMonitor(self.ctx.label, self.ctx.dir)
        self.grad_monitor.check(iteration, float(norm))

    # ------------------------------------------------------------------------------------------------ set-up

    def _prompt_texts(self, rows: list[dict]) -> list[str]:
        from alignment.errors import UserError

        if "prompt" in rows[0]:
            return [str(r["prompt"]) for r in rows]
        if "messages" in rows[0]:
            tok = self.policy.tokenizer
            return [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
        raise UserError(f"stages.{self.ctx.index}.prompts: {self.cfg.prompts!r} needs a `prompt` or `messages` column; "
                        f"columns found: {', '.join(sorted(rows[0]))}")

    def _fit_prompts(self, prompts: list[str]) -> tuple[list[str], int]:
        """(prompts, how many were cut): each cut from the left (its start token and most recent text kept) to
        ``max_prompt_length`` tokens and to the rollout context less ``max_new_tokens``, so that no engine cuts it."""
        from alignment.errors import UserError
        from alignment.truncation import fit_prompts

        cfg = self.cfg
        context = rollout_context(self.policy.base.config)
        if context - cfg.max_new_tokens < 1:
            raise UserError(f"stages.{self.ctx.index}.max_new_tokens: {cfg.max_new_tokens} new tokens leave no room "
                            f"for a prompt in the model's {context}-token context; lower `max_new_tokens`")
        budget = min(context - cfg.max_new_tokens, cfg.max_prompt_length or context)
        return fit_prompts(prompts, self.policy.tokenizer, budget, f"stages.{self.ctx.index}.prompts")

    def _reward_model(self):
        """The scorer, and it wrapped in normalisation: fixed from the reward model's training statistics when it
        has them (else running), running, or none (clipping only)."""
        from reward_models import Normalized, RuleReward, ToyGoldReward
        from reward_models.trained import TrainedRewardModel

        cfg = self.cfg
        if cfg.reward == "trained":
            model = TrainedRewardModel.load(self.ctx.artifact("reward_model"), policy=self.policy)
        elif cfg.reward == "toy_gold":
            model = ToyGoldReward()
        else:
            model = RuleReward(cfg.reward, f"stages.{self.ctx.index}.reward")
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


def requires(cfg: OnlineConfig) -> set[str]:
    return {"policy", "reward_model"} if cfg.reward == "trained" else {"policy"}


def make_engine(ctx: StageContext, policy):
    """`auto` takes vLLM when it is installed and supports the model, else HF, and says which and why. The adapter
    method decides the path first (alignment/methods.py: LoRA hot-swap, full-weight reload or HF only)."""
    from alignment.methods import rollout_path
    from alignment.metrics import console
    from alignment.rollout.hf import HFEngine
    from alignment.rollout.vllm import VLLMEngine, vllm_problem

    choice, sync, said = rollout_path(ctx, policy.base)
    console.print(said)
    if choice == "hf":
        return HFEngine(policy)
    if choice == "auto":
        problem = vllm_problem(policy.base.config)
        if problem:
            console.print(f"rollout.engine auto: using the HF engine ({problem})")
            return HFEngine(policy)
    return VLLMEngine(policy, sync, ctx.rollout.memory_fraction, getattr(ctx.adapter, "r", 16),
                      rollout_context(policy.base.config), ctx.seed, ctx.rollout.tensor_parallel_size,
                      ctx.rollout.sleep)


def rollout_context(model_config) -> int:
    """Tokens a rollout may hold (prompt + response): the model's context, at most 4096 (vLLM's max_model_len)."""
    return min(getattr(model_config, "max_position_embeddings", 4096), 4096)


# ------------------------------------------------------------------------------------------ tensor helpers


def pack(rollout, pad_id: int, device):
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


def token_logprobs(policy, adapter: str, seq, temperature: float, with_entropy: bool = False,
                   with_hidden: bool = False):
    """(B, T) log-probs of the response tokens (logits / temperature, as sampled) with ``adapter`` active, and
    (B, T) entropies with ``with_entropy`` (else None). ``with_hidden`` adds a third value: (B, T, H), the hidden
    state the LM head read at those positions (a shared-trunk critic's input)."""
    import torch

    from alignment.policy import real_token_logits

    captured = []
    with policy.using(adapter) as model:
        hook = model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: captured.append(args[0])) if with_hidden else None
        try:
            logits = model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"], use_cache=False).logits
        finally:
            if hook is not None:
                hook.remove()
    extra = logits.shape[1] - seq["input_ids"].shape[1]  # prompt tuning / P-tuning: virtual tokens first
    logits = real_token_logits(logits, seq["input_ids"])
    index = seq["positions"][:, :, None].expand(-1, -1, logits.shape[-1])
    logits = logits.gather(1, index).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, seq["response_ids"][:, :, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    if not with_hidden:
        return chosen, entropy
    hidden = captured[-1][:, max(extra, 0):]  # the same real-token positions as the logits
    return chosen, entropy, hidden.gather(1, seq["positions"][:, :, None].expand(-1, -1, hidden.shape[-1]))


def unshuffle(values, order):
    """``values`` computed on the rows ``order`` of a batch, back in the batch's own order (detached)."""
    import torch

    out = torch.empty_like(values)
    out[order] = values.detach()
    return out


def sync_diff(rollout, trainer_logprobs, mask) -> tuple[float, float] | None:
    """Mean and max |engine log-prob - trainer log-prob| over the sampled tokens, if the engine returned any."""
    import torch

    if not rollout.logprobs:
        return None
    engine = torch.zeros_like(trainer_logprobs)
    for i, row in enumerate(rollout.logprobs):
        engine[i, : len(row)] = torch.tensor(row, dtype=engine.dtype)
    diff = (engine - trainer_logprobs).abs() * mask
    return (diff.sum() / mask.sum().clamp(min=1)).item(), diff.max().item()


def average_gradients(params) -> None:
    """Data parallel (``accelerate launch``): every gradient becomes the mean over the ranks, which is what DDP does;
    our online loops switch adapters between the policy and critic losses, which a DDP wrapper cannot follow. No-op in
    one process."""
    from alignment import distributed

    if distributed.world_size() == 1:
        return
    from accelerate.utils import reduce

    for p in params:
        if p.grad is not None:
            p.grad.copy_(reduce(p.grad, reduction="mean"))


def mean_stats(stats: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in stats.items() if v}


class Minibatches:
    """``epochs`` passes over ``n`` samples in shuffled minibatches, stopping early once a recorded ``approx_kl``
    exceeds ``target_kl``::

        loop = Minibatches(n, cfg.ppo_epochs, cfg.minibatch_size, cfg.target_kl)
        for mb in loop:             # index tensors
            ...                     # losses, backward, optimiser step
            loop.record(pg_loss=..., approx_kl=...)
        loop.means(), loop.stopped
    """

    def __init__(self, n: int, epochs: int, size: int, target_kl: float | None):
        self.n, self.epochs, self.size, self.target_kl = n, epochs, size, target_kl
        self.stats: dict[str, list[float]] = {}
        self.stopped = False

    @property
    def single(self) -> bool:
        """One pass over one minibatch holding every sample: its forward runs before any update, so it also gives the
        sampling policy's log-probs (and the critic's values) and the separate no-grad pass over the batch can go."""
        return self.epochs == 1 and self.size >= self.n

    def __iter__(self):
        import torch

        for _ in range(self.epochs):
            for mb in torch.randperm(self.n).split(self.size):
                yield mb
                if self.stopped:
                    return

    def record(self, **values: float) -> None:
        from alignment import distributed

        for k, v in values.items():
            self.stats.setdefault(k, []).append(float(v))
        approx_kl = values.get("approx_kl", 0.0)
        if distributed.world_size() > 1:  # every rank must stop at the same step (their gradients are averaged)
            import torch
            from accelerate.utils import reduce

            approx_kl = float(reduce(torch.tensor([float(approx_kl)]), reduction="mean"))
        if self.target_kl is not None and approx_kl > self.target_kl:
            self.stopped = True

    def means(self) -> dict[str, float]:
        return mean_stats(self.stats)
