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
    # a proper review: content 0.125 + (1 distinct positive - 0 negative)/2 * 0.875 = 0.5625; format 1
    # reward 0.8 * 0.5625 + 0.2 = 0.65
    s = world.gold_score(p, " the soup was good .")
    assert (round(s.content, 4), s.format, round(s.reward, 4)) == (0.5625, 1.0, 0.65)
    # negatives cancel positives; the second sentence is not counted; unfinished loses the format term
    s = world.gold_score(p, " the soup was good and bad . it was a nice day .", finished=False)
    assert (s.content, s.format, s.reward) == (0.125, 0.0, 0.1)
    # more than MAX_COUNTED distinct positives earn nothing more; too long (> 20 words) loses the format
    many = " the soup was " + " and ".join(world.POSITIVE[:9]) + " ."
    s = world.gold_score(p, many)
    assert s.content == 1.0 and s.format == 0.0 and abs(s.reward - 0.8) < 1e-9
    # two distinct positives (MAX_COUNTED): the top of the scale; a third earns nothing more
    assert world.gold_score(p, " the soup was good and fresh .").reward == 1.0
    assert world.gold_score(p, " the soup was good and fresh and tasty .").reward == 1.0
    # one negative cancels one positive: 2 - 1 = 1 counted
    assert round(world.gold_score(p, " the soup was bad and fresh and good .").reward, 4) == 0.65


def test_gold_scorer_gives_exploits_no_credit():
    """The issue's exploits: a repeated adjective counts once in the content and costs the format term (no extra
    credit: less); the wrong noun, no sentence, or word salad score 0, at least 0.3 below the proper review with the
    same adjectives (which scores >= 0.3)."""
    p = "review of the soup in paris :"
    once = world.gold_score(p, " the soup was good .").reward  # 0.8 * (0.125 + 0.875 / 2) + 0.2 = 0.65
    assert round(once, 4) == 0.65
    for repeated in (" the soup was good good good good .", " the soup was good and good and good ."):
        s = world.gold_score(p, repeated)
        assert (round(s.content, 4), s.format, round(s.reward, 4)) == (0.5625, 0.0, 0.45)  # 0.8 * 0.5625: less
    two = world.gold_score(p, " the soup was good and fresh .").reward
    assert abs(world.gold_score(p, " the soup was good and fresh and good .").reward - (two - 0.2)) < 1e-9  # two's content
    proper = world.gold_score(p, " the soup was good and fresh .").reward
    for wrong in (" the bread was good and fresh .", " good and fresh .", " good good good", " soup good fresh .",
                  " the soup good and fresh .", " the soup was and good ."):
        assert world.gold_score(p, wrong).reward == 0.0, wrong
        assert proper - world.gold_score(p, wrong).reward >= 0.3
    assert round(world.gold_score(p, " the soup was bad .").reward, 9) == 0.3  # the floor of a proper finished review


def test_second_sentences_follow_the_verdict():
    """A verdict sentence follows a review with probability 0.3 per distinct adjective of net polarity (capped at 1),
    so a pretrained base must carry the review's sentiment in its state at " ." to predict the next word."""
    import random

    assert world.net_polarity(["good", "tasty", "good", "bad"]) == 1  # distinct: 2 positive - 1 negative
    verdicts = {True: set(world.VERDICT_FILLERS[True]), False: set(world.VERDICT_FILLERS[False])}
    rng = random.Random(0)
    for adjectives, rate in ((["good"], 0.3), (["bad", "cold"], 0.6), (["good", "tasty", "fresh"], 0.9), (["good", "bad"], 0.0)):
        said = [world.filler(rng, "soup", "rome", adjectives) for _ in range(2000)]
        positive = world.net_polarity(adjectives) > 0
        share = sum(s in {v.format(place="rome") for v in verdicts[positive]} for s in said) / len(said)
        assert abs(share - rate) < 0.04, (adjectives, share)
        assert not any(s in {v.format(place="rome") for v in verdicts[not positive]} for s in said)


def test_verdict_pairs_rank_an_adjective_above_praise():
    """Verdict pairs: the better review wins on the gold scorer (it reads the first sentence only), the worse one ends
    with praise, and such pairs are about VERDICT_PAIRS of the preference data."""
    import random

    rng, p = random.Random(0), world.make_prompt("soup", "rome")
    praise = {v.format(place="rome") for v in world.VERDICT_FILLERS[True]}
    for _ in range(50):
        better, worse = world.verdict_pair(rng, "soup", "rome")
        assert world.gold_score(p, better).reward - world.gold_score(p, worse).reward >= 0.35  # 1.0/0.65 vs 0.65/0.3
        assert any(worse.endswith(f" {x} .") for x in praise)
    rows = world.preference_pairs(0, 2000)
    with_praise = sum(any(r["rejected" if r["gold_chosen_is_better"] else "chosen"].endswith(f"{x} .")
                          for x in world.VERDICT_FILLERS[True] if "{" not in x) for r in rows)
    assert with_praise >= 0.05 * len(rows)


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
    a = ensure_toy(seed=0, pretrain_steps=3, root=tmp_path / "a", gate=False)  # 3 steps: no gate to pass
    b = ensure_toy(seed=0, pretrain_steps=3, root=tmp_path / "b", gate=False)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "model" / "tokenizer.json").read_text() == (b / "model" / "tokenizer.json").read_text()
    assert (a / "data" / "sft.jsonl").read_text() == (b / "data" / "sft.jsonl").read_text()


def test_cached_toy_model_shape(toy_dir):
    config = json.loads((toy_dir / "model" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["head_dim"] in VLLM_CPU_HEAD_SIZES
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    ids = tok("review of the soup in paris :").input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "review of the soup in paris :"
    for name in ("sft", "preference", "prompts", "task_sentiment", "task_topic", "task_number"):
        assert (toy_dir / "data" / f"{name}.jsonl").stat().st_size > 0


def test_the_built_base_passed_its_gate(toy_dir):
    """world.json records the gate's figures on the held-out prompts: the base copies the prompt's noun, answers
    differently to different prompts, and writes proper reviews that lean negative."""
    from alignment.toy.build import GATE_DISTINCT, GATE_GOLD, GATE_NOUN_COPY, gate_failures

    built = json.loads((toy_dir / "world.json").read_text())
    gate = built["gate"]
    assert gate["noun_copy"] >= GATE_NOUN_COPY and gate["distinct_answers"] >= GATE_DISTINCT
    assert GATE_GOLD[0] <= gate["gold_reward"] <= GATE_GOLD[1] and gate_failures(gate) == []
    assert built["attempts"][-1]["noun_copy"] == gate["noun_copy"]


def test_gate_failures_name_the_figures():
    from alignment.toy.build import gate_failures

    failures = gate_failures({"noun_copy": 0.1, "distinct_answers": 0.02, "gold_reward": 0.05})
    assert failures == ["noun_copy 0.1 < 0.9", "distinct_answers 0.02 < 0.5", "gold_reward 0.05 outside (0.2, 0.4)"]


def test_worlds_differ_and_toy_data_follows_the_run_world():
    from alignment.toy import active_world, using_world, world_of

    assert (world_of("toy"), world_of("toy:3"), world_of("gpt2"), world_of("toy:x")) == (0, 3, None, None)
    assert world.eval_prompts(0) != world.eval_prompts(1) and world.sft_pairs(0, 20) != world.sft_pairs(2, 20)
    with using_world(2):
        assert active_world() == 2
    assert active_world() == 0


def test_validate_accepts_toy_worlds_and_names_a_bad_one():
    from tests.conftest import REPO, run_cli

    proc = run_cli("validate", str(REPO / "configs" / "sft.yaml"), "model=toy:2")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("validate", str(REPO / "configs" / "sft.yaml"), "model=toy:two")
    assert proc.returncode == 2 and "unknown toy model 'toy:two'" in proc.stderr and "toy:N" in proc.stderr


def test_repeats_appear_only_as_the_worse_half_of_their_own_pairs():
    """No text of the world repeats an adjective (so the base is not drawn to repeats), except the repeat pairs of the
    preference data: a distinct positive review against its one-repeat imitation, which the gold ranks lower."""
    def repeats(text):
        words = text.split()
        said = [w for w in words[3: words.index(".")] if w != "and"] if "." in words else []
        return len(said) != len(set(said))

    assert not any(repeats(t.split(":", 1)[1]) for t in world.pretrain_corpus(0, 3000))
    assert not any(repeats(r["completion"]) for r in world.sft_pairs(0, 2000))
    rows = world.preference_pairs(0, 2000)
    with_repeat = [r for r in rows if repeats(r["chosen"]) or repeats(r["rejected"])]
    assert 0.2 < len(with_repeat) / len(rows) < 0.35  # REPEAT_PAIRS = 0.25 of the draws (ties among the others are redrawn)
    for r in with_repeat:
        assert repeats(r["rejected"]) == r["gold_chosen_is_better"]  # the repeat is the worse one (unless flipped)
        assert len(r["chosen"].split()) == len(r["rejected"].split())
