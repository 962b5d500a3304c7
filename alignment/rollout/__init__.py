"""Rollout engines: ``generate(prompts, sampling) -> Rollout`` and ``sync(policy)``.

- ``HFEngine``: ``generate()`` on the shared policy itself (always in sync, no copy of the weights).
- ``VLLMEngine``: one vLLM engine per stage, synced by LoRA hot-swap or an in-place weight reload.
Both sample with only the stage's settings (temperature, top_p; no model generation_config defaults) and stop on the
same ids (``stop_token_ids``); ``finished`` means the response ended on one of them.
Log-probs the PPO loss uses are recomputed by the trainer; an engine's own log-probs only feed the sync check.
"""

from __future__ import annotations

import contextlib
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
    response_ids: list[list[int]]  # up to and including the stop id (stop_token_ids) when the response ended
    texts: list[str]  # decoded responses, special tokens skipped
    finished: list[bool]  # ended on a stop id; False: hit max_new_tokens without one
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


def generating_model(model):
    """The transformers model whose ``generate`` runs under ``model`` (a peft wrapper, a fused model or the model
    itself): the outermost module holding a ``GenerationConfig`` of its own."""
    from transformers import GenerationConfig

    for module in model.modules():
        if isinstance(vars(module).get("generation_config"), GenerationConfig):
            return module
    return model


def stop_token_ids(tokenizer, model) -> list[int]:
    """The ids a response ends on, for every engine and every check of "finished": the tokenizer's eos first, then
    each eos id of the model's generation_config and config (Llama 3 and Qwen list several, and vLLM stops on all of
    them). ``model``: the transformers model or any wrapper of it."""
    model = generating_model(model)
    ids = [tokenizer.eos_token_id]
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        ids += list(value) if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def describe_stop_ids(tokenizer, ids: list[int]) -> str | None:
    """One line naming the stop set when it is more than the tokenizer's eos (None otherwise)."""
    if len(ids) < 2:
        return None
    named = ", ".join(f"{i} {tokenizer.convert_ids_to_tokens(i)!r}" for i in ids)
    return (f"model: generation stops on any of {len(ids)} eos ids ({named}): the tokenizer's eos plus the model's "
            "generation_config/config eos_token_id; a response that ends on one counts as finished")


@contextlib.contextmanager
def plain_generation(model):
    """``model.generate`` with transformers' neutral defaults instead of the model's generation_config: transformers
    fills every setting a call leaves unset from it (a hub model's repetition_penalty, no_repeat_ngram_size, top_k,
    ...), which would change the sampler behind the trainer's back. Rollouts name every setting they use."""
    from transformers import GenerationConfig

    target = generating_model(model)
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved
