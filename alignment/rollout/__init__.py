"""Rollout engines: ``generate(prompts, sampling) -> Rollout`` and ``sync(policy)``.

- ``HFEngine``: ``generate()`` on the shared policy itself (always in sync, no copy of the weights).
Log-probs the PPO loss uses are recomputed by the trainer; an engine's own log-probs only feed the sync check.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0


def request_seed(run_seed: int, iteration: int, index: int) -> int:
    """The sampling seed of one rollout request: a hash of (run seed, online iteration, position of the request in
    the iteration's global batch), so the same request of a resumed run samples the same tokens (63 bits)."""
    import hashlib

    digest = hashlib.blake2b(f"{run_seed}:{iteration}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


@dataclasses.dataclass
class Rollout:
    prompts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # up to and including eos when the response ended
    texts: list[str]  # decoded responses, special tokens skipped
    finished: list[bool]  # False: hit max_new_tokens without eos
    logprobs: list[list[float]] | None = None  # engine's log-probs of the sampled tokens (after temperature)


class RolloutEngine(Protocol):
    name: str
    sync_mode: str

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> Rollout:
        """``seeds``: a sampling seed per prompt, for engines whose sampler state a checkpoint cannot hold (vLLM)."""
        ...

    def sync(self, policy) -> float:
        """Hand the engine the policy as it is now; returns seconds spent."""
        ...


def completion_text(tokenizer, prompt_ids: list[int], response_ids: list[int]) -> str:
    """The response as it continues the prompt's text (keeping a leading space that decoding alone would drop),
    so ``prompt + completion`` re-tokenises like the trained data."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=True)
    return full[len(prompt) :] if full.startswith(prompt) else tokenizer.decode(response_ids, skip_special_tokens=True)
