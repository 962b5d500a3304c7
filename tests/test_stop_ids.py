"""A hub-like model on the toy: several eos ids and a generation_config with its own sampling settings.

Built locally from the toy model (no download): config.json and generation_config.json list a second eos id (the
token "." ends the toy's sentences, so the pretrained toy model emits it in most answers), and generation_config.json
sets repetition_penalty / no_repeat_ngram_size / top_k, as hub models do. Both engines must stop on either id and call
the response finished, and sample with the stage's settings only, so that their log-probs are the trainer's.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from alignment.config import AdapterConfig
from alignment.policy import SharedPolicy
from alignment.rollout import Sampling, request_seed
from stages.online import pack, sync_diff, token_logprobs

PROMPTS = ["review of the soup in paris :", "review of the bike in oslo :", "review of the tea in rome :",
           "review of the cake in lima :"] * 4
SAMPLE = Sampling(max_new_tokens=24, temperature=1.0)
EOS, PERIOD = 3, 5  # the toy tokenizer's eos and "." (checked in the fixture)


@pytest.fixture(scope="module")
def hub_like(toy_dir, tmp_path_factory):
    """The toy model folder with eos ids [eos, "."] and a generation_config that would change the sampler."""
    folder = tmp_path_factory.mktemp("hub-like") / "model"
    shutil.copytree(toy_dir / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert config["eos_token_id"] == EOS
    config["eos_token_id"] = [EOS, PERIOD]
    generation.update(eos_token_id=[EOS, PERIOD], repetition_penalty=1.5, no_repeat_ngram_size=2, top_k=5)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def policy(hub_like):
    policy = SharedPolicy.load(str(hub_like))
    assert policy.tokenizer.convert_ids_to_tokens(PERIOD) == "." and policy.tokenizer.eos_token_id == EOS
    policy.add_adapter("policy", AdapterConfig(r=4))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (a fresh one is the base itself)
        for name, p in policy.model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return policy


def trainer_diff(policy, rollout) -> float:
    """The online stages' sync check: mean |engine log-prob - trainer log-prob| per sampled token."""
    seq = pack(rollout, policy.tokenizer.pad_token_id, policy.base.device)
    with torch.no_grad():
        trainer, _ = token_logprobs(policy, "policy", seq, SAMPLE.temperature)
    return sync_diff(rollout, trainer, seq["response_mask"])[0]


def assert_ends_on_stop_ids(rollout) -> None:
    """Every response ends at its first stop id (finished) or runs to max_new_tokens without one (unfinished), and
    some end on the second eos id."""
    for ids, finished in zip(rollout.response_ids, rollout.finished):
        assert EOS not in ids[:-1] and PERIOD not in ids[:-1], ids  # no engine runs past a stop id
        assert finished == (ids[-1] in (EOS, PERIOD)), (ids, finished)
        assert finished or len(ids) == SAMPLE.max_new_tokens
    ends = [ids[-1] for ids, finished in zip(rollout.response_ids, rollout.finished) if finished]
    assert ends.count(PERIOD) >= len(PROMPTS) // 2, ends  # the toy model ends most sentences with "."


def test_stop_set_is_every_eos_id_and_said_once(hub_like, toy_dir, caplog):
    from alignment.rollout import stop_token_ids

    with caplog.at_level(logging.INFO, logger="alignment"):
        policy = SharedPolicy.load(str(hub_like))
    assert stop_token_ids(policy.tokenizer, policy.base) == [EOS, PERIOD]
    said = [r.getMessage() for r in caplog.records if "eos ids" in r.getMessage()]
    assert said == ["model: generation stops on any of 2 eos ids (3 '</s>', 5 '.'): the tokenizer's eos plus the "
                    "model's generation_config/config eos_token_id; a response that ends on one counts as finished"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignment"):
        toy = SharedPolicy.load(str(toy_dir / "model"))
    assert stop_token_ids(toy.tokenizer, toy.base) == [EOS]
    assert not [r for r in caplog.records if "eos ids" in r.getMessage()]  # one eos: nothing to say


def test_hf_engine_stops_on_every_eos_id_and_samples_with_the_stage_settings_only(policy):
    from alignment.rollout.hf import HFEngine

    torch.manual_seed(0)
    rollout = HFEngine(policy).generate(PROMPTS, SAMPLE)
    # repetition_penalty 1.5 / no_repeat_ngram_size 2 / top_k 5 in generation_config.json would move the engine's
    # log-probs away from the trainer's by far more than this
    assert trainer_diff(policy, rollout) < 1e-4
    assert_ends_on_stop_ids(rollout)
    assert policy.base.generation_config.repetition_penalty == 1.5  # the model's own config is left as it was


def test_gold_evaluator_decodes_greedily_to_the_first_stop_id(policy):
    """The greedy evaluators (gold reward, continual `generate`) take the argmax of the model's own logits, not
    of logits the model's generation_config penalises, and stop on the same ids as the rollouts."""
    from alignment.evaluation import generate_greedy

    prompts = PROMPTS[:4]
    with policy.using("policy") as model:
        completions = generate_greedy(model, policy.tokenizer, prompts, max_new_tokens=24)
        expected = [argmax_decode(model, policy.tokenizer, p, 24) for p in prompts]
    assert completions == expected
    assert sum(text.endswith(".") for text, _ in completions) >= 2


@torch.no_grad()
def argmax_decode(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new = []
    for _ in range(max_new_tokens):
        new.append(int(model(input_ids=torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1].argmax()))
        if new[-1] in (EOS, PERIOD):
            return tokenizer.decode(new, skip_special_tokens=True), True
    return tokenizer.decode(new, skip_special_tokens=True), False


def test_vllm_engine_stops_on_every_eos_id_calls_it_finished_and_matches_the_trainer(policy):
    pytest.importorskip("vllm")
    from alignment.rollout.vllm import VLLMEngine

    engine = VLLMEngine(policy, "merged", memory_fraction=0.3, lora_rank=16, max_model_len=128, seed=0)
    try:
        rollout = engine.generate(PROMPTS, SAMPLE, [request_seed(0, 1, i) for i in range(len(PROMPTS))])
    finally:
        engine.close()
    assert_ends_on_stop_ids(rollout)
    assert engine.stop == [EOS, PERIOD]  # the HF engine's set (stop_token_ids), passed to vLLM explicitly
    assert all(text.endswith(".") for ids, text in zip(rollout.response_ids, rollout.texts) if ids[-1] == PERIOD)
    assert trainer_diff(policy, rollout) < 1e-3  # the sync check's in-sync bound (tests/test_vllm_engine.py)
