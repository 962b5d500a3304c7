"""The embedded toy world: deterministic data and builds, the gold scorer, vLLM-compatible shape."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from alignment.toy import world
from alignment.toy.build import ensure_toy

VLLM_CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


def test_gold_scorer_by_hand():
    p = "review of the soup in paris :"
    # noun (0.2) + (2 positive - 0 negative)/3 * 0.8 = 0.7333 content; format 1 -> 0.8*0.7333 + 0.2 = 0.78667
    s = world.gold_score(p, " the soup was good and fresh .")
    assert (round(s.content, 4), s.format, round(s.reward, 4)) == (0.7333, 1.0, 0.7867)
    # negatives cancel positives; the second sentence is not counted; unfinished loses the format term
    s = world.gold_score(p, " the soup was good and bad . it was a nice day .", finished=False)
    assert (round(s.content, 6), s.format) == (0.2, 0.0)
    # more than MAX_COUNTED positives earn nothing more; too long loses the format
    many = " the soup was " + " and ".join(["good"] * 9) + " ."
    s = world.gold_score(p, many)
    assert s.content == 1.0 and s.format == 0.0 and abs(s.reward - 0.8) < 1e-9
    assert round(world.gold_score(p, " the bread was good .").content, 4) == 0.2667  # no noun: 0.8 * 1/3


def test_data_is_deterministic_from_the_seed():
    assert world.sft_pairs(0, 50) == world.sft_pairs(0, 50)
    assert world.sft_pairs(0, 50) != world.sft_pairs(1, 50)
    assert world.preference_pairs(0, 30) == world.preference_pairs(0, 30)
    # evaluation prompts never appear in training data
    held_out = set(world.eval_prompts(0))
    assert len(held_out) == 128
    assert not held_out & {r["prompt"] for r in world.sft_pairs(0, 2000)}
    assert not held_out & {r["prompt"] for r in world.rl_prompts(0, 1000)}


def test_reviews_have_one_polarity():
    """Adjectives of one review share a polarity (up to the noise): sentiment is one feature to learn."""
    rows = world.sft_pairs(0, 2000)
    mixed = sum(
        bool(set(r["completion"].split()) & set(world.POSITIVE)) and bool(set(r["completion"].split()) & set(world.NEGATIVE))
        for r in rows
    )
    assert mixed / len(rows) < 0.15  # 1-3 adjectives, each flipped with probability ADJECTIVE_NOISE = 0.1
    positive = sum(bool(set(r["completion"].split()[:4]) & set(world.POSITIVE)) for r in rows) / len(rows)
    assert 0.7 < positive < 0.9  # SFT answers lean positive (80 % of reviews)


def test_preference_labels_follow_gold_with_noise():
    rows = world.preference_pairs(0, 1000)
    agree = sum(r["gold_chosen_is_better"] for r in rows) / len(rows)
    assert 0.85 < agree < 0.95
    for r in rows[:50]:
        better = world.gold_score(r["prompt"], r["chosen"]).reward > world.gold_score(r["prompt"], r["rejected"]).reward
        assert better == r["gold_chosen_is_better"]


def test_toy_build_is_deterministic(tmp_path):
    a = ensure_toy(seed=0, pretrain_steps=3, root=tmp_path / "a")
    b = ensure_toy(seed=0, pretrain_steps=3, root=tmp_path / "b")
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "model" / "tokenizer.json").read_text() == (b / "model" / "tokenizer.json").read_text()
    assert (a / "data" / "sft.jsonl").read_text() == (b / "data" / "sft.jsonl").read_text()


def test_cached_toy_model_shape(toy_dir):
    config = json.loads((toy_dir / "model" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["hidden_size"] // config["num_attention_heads"] in VLLM_CPU_HEAD_SIZES
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    ids = tok("review of the soup in paris :").input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "review of the soup in paris :"
    for name in ("sft", "preference", "prompts", "task_sentiment", "task_topic", "task_number"):
        assert (toy_dir / "data" / f"{name}.jsonl").stat().st_size > 0
