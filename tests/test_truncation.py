"""Truncation that keeps the answer (alignment/truncation.py): the rule on hand-computed token lists, the text fitter on
the toy tokenizer, and what the real trainers receive on long multi-turn transcripts (prompts longer than max_length)
in every stage that reads pairs or completions: reward, DPO, KTO, ORPO, PPO's prompts, SFT, EWC on a pair task.

The transcripts are built from the toy vocabulary (the toy tokenizer is word-level: any other word is <unk>), as
``user : review of the soup in paris : assistant : the soup was good . user : ...``, ten tokens per turn and more.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from alignment.algorithms.preference import pairwise_accuracy, pairwise_outcomes, tie_rate
from alignment.errors import UserError
from alignment.truncation import (
    IDENTICAL,
    RESPONSE_TOO_LONG,
    PromptFitter,
    cut_prompt,
    fit_example,
    fit_messages,
    fit_prompts,
    fit_rows,
)

BOS, EOS = 2, 3  # the toy tokenizer's <s> and </s>
MAX_LENGTH = 64


# ------------------------------------------------------------------------------------------ the rule, by hand


def test_cut_prompt_keeps_the_start_token_and_the_most_recent_tokens():
    prompt = [BOS, 10, 11, 12, 13, 14, 15]
    assert cut_prompt(prompt, 3, 6, keep_start=1) == [BOS, 14, 15]  # room 6 - 3 = 3: BOS + the last two
    assert cut_prompt(prompt, 3, 10, keep_start=1) == prompt  # fits: unchanged
    assert cut_prompt(prompt, 3, 20, max_prompt_length=2, keep_start=1) == [BOS, 15]  # max_prompt_length binds
    assert cut_prompt(prompt, 5, 6, keep_start=1) == [BOS]  # an empty-ish prompt: the start token alone
    assert cut_prompt(prompt, 6, 6, keep_start=1) is None  # the response cannot fit even then
    assert cut_prompt(prompt, 3, 6, keep_start=0) == [13, 14, 15]  # no start token (a tokenizer without BOS)
    assert cut_prompt([BOS, 7], 0, 1, keep_start=1) == [BOS]


def test_fit_example_drops_identical_and_too_long_pairs():
    prompt = [BOS, 10, 11, 12, 13]
    assert fit_example(prompt, [[20, EOS], [21, 22, EOS]], 5, keep_start=1) == ([BOS, 13], None)
    assert fit_example(prompt, [[20, EOS], [20, EOS]], 50, keep_start=1) == (None, IDENTICAL)
    assert fit_example(prompt, [[20, EOS], [21, 22, 23, 24, EOS]], 5, keep_start=1) == (None, RESPONSE_TOO_LONG)
    assert fit_example(prompt, [[20, 21, EOS]], 50, keep_start=1) == (prompt, None)  # one response: never identical


def test_pairwise_accuracy_counts_ties_half():
    # 3 right, 1 wrong, 2 ties: (3 + 0 + 2 * 0.5) / 6
    chosen = torch.tensor([1.0, 2.0, 3.0, 0.0, 5.0, 6.0])
    rejected = torch.tensor([0.0, 1.0, 2.0, 1.0, 5.0, 6.0])
    assert pairwise_outcomes(chosen, rejected).tolist() == [1, 1, 1, 0, 0.5, 0.5]
    assert pairwise_accuracy(chosen, rejected) == pytest.approx((3 + 1) / 6)
    assert tie_rate(chosen, rejected) == pytest.approx(2 / 6)
    # against labels (False: the rejected answer is truly the better one): pairs 0 and 3 flip, ties stay half
    truth = torch.tensor([False, True, True, False, True, False])
    assert pairwise_accuracy(chosen, rejected, truth) == pytest.approx((0 + 1 + 1 + 1 + 0.5 + 0.5) / 6)


def test_reward_stage_evaluation_counts_ties_half():
    from stages.reward import RewardStage

    scores = {"c": [1.0, 2.0, 3.0, 0.0, 5.0, 6.0], "r": [0.0, 1.0, 2.0, 1.0, 5.0, 6.0]}
    rows = [{"prompt": "p", "chosen": f" c{i}", "rejected": f" r{i}", "gold_chosen_is_better": True}
            for i in range(6)]

    def rewards(batch, key):
        return torch.tensor([scores[r[key].strip()[0]][int(r[key].strip()[1])] for r in batch])

    m = RewardStage._evaluate(rows, rewards, batch_size=4)
    assert m["eval_accuracy"] == round(4 / 6, 4) and m["eval_accuracy_noisy"] == round(4 / 6, 4)
    assert m["tie_rate"] == round(2 / 6, 4) and m["eval_pairs"] == 6


def test_choice_accuracy_counts_a_tie_of_k_choices_as_one_kth(monkeypatch):
    from alignment import continual

    examples = [{"prompt": "p", "choices": [" a", " b"], "answer": 0} for _ in range(4)]
    # right, wrong, tie, tie: (1 + 0 + 0.5 + 0.5) / 4 (the old argmax gave every tie to the first choice, the answer)
    monkeypatch.setattr(continual, "completion_scores", lambda *a, **k: [0.0, -1.0, -1.0, 0.0, -2.0, -2.0, 0.5, 0.5])
    assert continual.task_accuracy(None, None, examples) == pytest.approx(2 / 4)


# ------------------------------------------------------------------------------------- transcripts, tokenizer


def transcripts(n: int, seed: int, identical_every: int = 0) -> list[dict]:
    """Long multi-turn transcripts in the toy language: 6-10 earlier turns (14 tokens each), then the last user turn;
    each row's last turn names its own (noun, place), so a cut prompt can be matched to its row."""
    from alignment.toy import world

    rng = random.Random(seed)
    pairs = rng.sample(world.all_prompt_pairs(), n)
    rows = []
    for i, (noun, place) in enumerate(pairs):
        turns = []
        for _ in range(rng.randint(6, 10)):
            old_noun, old_place = rng.choice(world.all_prompt_pairs())
            turns.append(f"user : review of the {old_noun} in {old_place} :\n\nassistant : the {old_noun} was "
                         f"{rng.choice(world.POSITIVE)} .")
        last = f"user : review of the {noun} in {place} :\n\nassistant :"
        chosen = f" the {noun} was {rng.choice(world.POSITIVE)} and {rng.choice(world.POSITIVE)} ."
        rejected = f" the {noun} was {rng.choice(world.NEGATIVE)} ."
        if identical_every and i % identical_every == 0:  # different text, one token sequence (unknown words: <unk>)
            chosen, rejected = f" the {noun} was zzzgood .", f" the {noun} was qqqbad ."
        rows.append({"prompt": "\n\n".join(turns) + "\n\n" + last, "chosen": chosen, "rejected": rejected,
                     "last": last})
    return rows


@pytest.fixture(scope="module")
def tokenizer(toy_dir):
    from alignment.policy import load_tokenizer

    return load_tokenizer(str(toy_dir / "model"))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_fitter_keeps_the_start_token_the_last_turn_and_the_answer(tokenizer):
    row = transcripts(1, seed=1)[0]
    assert len(tokenizer(row["prompt"]).input_ids) > 90  # a prompt longer than max_length on its own
    (fitted,) = PromptFitter(tokenizer, 40).fit([row["prompt"]], [[row["chosen"], row["rejected"]]])
    assert fitted.cut and fitted.reason is None
    sequence = tokenizer(fitted.prompt + row["chosen"] + tokenizer.eos_token).input_ids
    assert len(sequence) <= 40 and sequence[0] == BOS
    assert sequence[-len(ids(tokenizer, row["chosen"])) - 1 :] == ids(tokenizer, row["chosen"]) + [EOS]
    prompt_ids = tokenizer(fitted.prompt).input_ids
    assert prompt_ids[-len(ids(tokenizer, row["last"])) :] == ids(tokenizer, row["last"])
    assert row["prompt"].endswith(fitted.prompt)  # only the oldest text went
    # without eos (the reward model's scoring) one more prompt token fits
    (no_eos,) = PromptFitter(tokenizer, 40, eos=False).fit([row["prompt"]], [[row["chosen"], row["rejected"]]])
    assert len(tokenizer(no_eos.prompt).input_ids) == len(prompt_ids) + 1


def test_fit_rows_counts_drops_and_stops_past_max_dropped_fraction(tokenizer):
    rows = transcripts(10, seed=2, identical_every=5)  # rows 0 and 5: identical after tokenization
    rows[3]["chosen"] = " the soup was" + " good and" * 30 + " nice ."  # an answer longer than max_length
    fitter = PromptFitter(tokenizer, MAX_LENGTH, field="stages.1.data")
    report = fit_rows(rows, fitter, ("chosen", "rejected"), "truncate", 0.4, already_identical=1)  # 4 of 11 lost
    assert report.dropped == {IDENTICAL: 3, RESPONSE_TOO_LONG: 1} and report.total == 11 and len(report.rows) == 7
    assert report.metrics() == {"dropped_pairs": {IDENTICAL: 3, RESPONSE_TOO_LONG: 1}, "long_prompts_truncated": 7}
    with pytest.raises(UserError, match=r"^stages\.1\.data: 4 of 11 pairs cannot be trained on at max_length 64 "
                                        r"\(identical after tokenization: 3, answer longer .*: 1\), more than "
                                        r"max_dropped_fraction 0\.3; raise `max_length`, or set "
                                        r"`max_dropped_fraction`"):
        fit_rows(rows, fitter, ("chosen", "rejected"), "truncate", 0.3, already_identical=1)
    with pytest.raises(UserError, match=r"stages\.1\.data: 8 of 10 prompts do not fit max_length 64 with their "):
        fit_rows(rows, fitter, ("chosen", "rejected"), "refuse", 1.0)


def test_fit_messages_drops_the_oldest_turns_and_keeps_the_system_message(tokenizer):
    row = transcripts(1, seed=3)[0]
    turns = [{"role": "system", "content": "review the place"}]
    for text in row["prompt"].split("\n\nuser : ")[:-1]:
        question, answer = text.removeprefix("user : ").split("\n\nassistant : ")
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    turns += [{"role": "user", "content": "review of the tea in oslo :"},
              {"role": "assistant", "content": "the tea was good ."}]
    report = fit_messages([{"messages": turns}], tokenizer, MAX_LENGTH, "truncate", 0.2, "stages.0.data")
    (kept,) = report.rows
    assert report.cut == 1 and kept["messages"][0] == turns[0] and kept["messages"][-2:] == turns[-2:]
    assert kept["messages"][1]["role"] == "user" and len(kept["messages"]) < len(turns)
    rendered = tokenizer.apply_chat_template(kept["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert len(rendered) <= MAX_LENGTH


def test_online_prompts_are_cut_from_the_left(tokenizer):
    rows = transcripts(3, seed=4)
    prompts, cut = fit_prompts([r["prompt"] for r in rows], tokenizer, 30, "stages.5.prompts")
    assert cut == 3
    for p, r in zip(prompts, rows):
        prompt_ids = tokenizer(p).input_ids
        assert len(prompt_ids) <= 30 and prompt_ids[0] == BOS and r["prompt"].endswith(p)
        assert prompt_ids[-len(ids(tokenizer, r["last"])) :] == ids(tokenizer, r["last"])


# ---------------------------------------------------------------------- what the real trainers receive


def write_jsonl(path, rows, keys):
    path.write_text("".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows))
    return str(path)


class Spy:
    """Records what the trainers are handed: TRL's prepared datasets, ORPO's tokenized rows, the reward stage's texts,
    the rollout engine's prompt ids, and the reward stage's evaluation scores."""

    def __init__(self, mp):
        import trl
        from trl.experimental.orpo import ORPOTrainer

        import reward_models.trained
        from alignment.rollout.hf import HFEngine
        from stages.reward import RewardStage

        self.seen = {"sft": [], "dpo": [], "kto": [], "orpo": [], "reward": [], "rollout": [], "evaluate": []}
        for name, cls in (("sft", trl.SFTTrainer), ("dpo", trl.DPOTrainer), ("kto", trl.KTOTrainer)):
            mp.setattr(cls, "_prepare_dataset", self._dataset(name, cls._prepare_dataset))
        tokenize_row = ORPOTrainer.tokenize_row

        def orpo_row(trainer, feature, *args, **kwargs):
            out = tokenize_row(trainer, feature, *args, **kwargs)
            self.seen["orpo"].append(out)
            return out

        mp.setattr(ORPOTrainer, "tokenize_row", orpo_row)
        sequence_rewards = reward_models.trained.sequence_rewards

        def rewards(policy, adapter, head, texts, max_length):
            self.seen["reward"].append((list(texts), max_length))
            return sequence_rewards(policy, adapter, head, texts, max_length)

        mp.setattr(reward_models.trained, "sequence_rewards", rewards)
        generate = HFEngine.generate

        def rollout(engine, prompts, *args, **kwargs):
            out = generate(engine, prompts, *args, **kwargs)
            self.seen["rollout"] += out.prompt_ids
            return out

        mp.setattr(HFEngine, "generate", rollout)
        evaluate = RewardStage._evaluate

        def spy_evaluate(eval_rows, score, batch_size):
            with torch.no_grad():
                self.seen["evaluate"].append((eval_rows, score(eval_rows, "chosen"), score(eval_rows, "rejected")))
            return evaluate(eval_rows, score, batch_size)

        mp.setattr(RewardStage, "_evaluate", staticmethod(spy_evaluate))

    def _dataset(self, name, prepare):
        def wrapped(trainer, dataset, *args, **kwargs):
            out = prepare(trainer, dataset, *args, **kwargs)
            self.seen[name] += out.to_list()
            return out

        return wrapped


STEP = {"max_steps": 1, "batch_size": 4, "max_length": MAX_LENGTH, "eval_fraction": 0.0}


@pytest.fixture(scope="module")
def long_run(toy_dir, tmp_path_factory):
    """SFT -> reward -> DPO -> KTO -> ORPO -> PPO, a step each, on long transcripts (prompts of 94-150 tokens)."""
    from alignment.config import config_from_dict
    from alignment.pipeline import Pipeline

    out = tmp_path_factory.mktemp("long")
    train, held_out = transcripts(40, seed=5, identical_every=10), transcripts(12, seed=6, identical_every=12)
    pairs = write_jsonl(out / "pairs.jsonl", train, ("prompt", "chosen", "rejected"))
    sft = write_jsonl(out / "sft.jsonl", [{**r, "completion": r["chosen"]} for r in train[1:]],
                      ("prompt", "completion"))
    prompts = write_jsonl(out / "prompts.jsonl", held_out, ("prompt",))
    stages = [
        {"kind": "sft", "data": sft, **STEP, "max_samples": 8},
        {"kind": "reward", "data": pairs, "eval_data": write_jsonl(out / "eval.jsonl", held_out, ("prompt", "chosen",
                                                                                               "rejected")),
         **STEP, "max_steps": 2},
        {"kind": "dpo", "data": pairs, **STEP, "max_samples": 8},
        {"kind": "kto", "data": pairs, **STEP, "max_samples": 8},
        {"kind": "orpo", "data": pairs, **STEP, "max_samples": 8},
        {"kind": "ppo", "prompts": prompts, "iterations": 1, "batch_size": 2, "minibatch_size": 2, "ppo_epochs": 1,
         "max_new_tokens": 8, "rollout": {"engine": "hf"}},
    ]
    raw = {"name": "long", "model": str(toy_dir / "model"), "output_dir": str(out), "logging": {"log_every": 50},
           "stages": stages}
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        config, warnings = config_from_dict(raw)
        pipeline = Pipeline(config, warnings)
        summary = pipeline.run()
    return summary, spy.seen, {"train": train, "held_out": held_out}


def rows_by_last_turn(tokenizer, rows):
    return {tuple(ids(tokenizer, r["last"])): r for r in rows}


def check_prompt(tokenizer, prompt_ids, rows, limit):
    """The prompt starts with BOS and ends with its row's whole last turn; returns that row."""
    assert prompt_ids[0] == BOS and len(prompt_ids) <= limit
    last = len(ids(tokenizer, rows[0]["last"]))
    row = rows_by_last_turn(tokenizer, rows).get(tuple(prompt_ids[-last:]))
    assert row is not None, tokenizer.decode(prompt_ids)
    assert len(prompt_ids) < len(tokenizer(row["prompt"]).input_ids)  # it was cut: the oldest text went
    return row


def test_reward_stage_trains_and_evaluates_on_whole_answers(long_run, tokenizer):
    summary, seen, data = long_run
    m = summary["stages"][1]["metrics"]
    assert m["dropped_pairs"] == {IDENTICAL: 4, RESPONSE_TOO_LONG: 0}  # rows 0, 10, 20, 30
    assert m["dropped_eval_pairs"] == {IDENTICAL: 1, RESPONSE_TOO_LONG: 0}
    assert m["long_prompts_truncated"] == 36 and m["eval_long_prompts_truncated"] == 11 and m["eval_pairs"] == 11
    # the reward stage's calls (PPO's reward model scores at its own 512) alternate: chosen then rejected of one batch
    # (training steps, evaluation, the score statistics)
    calls = [texts for texts, max_length in seen["reward"] if max_length == MAX_LENGTH]
    assert len(calls) >= 6 and len(calls) % 2 == 0
    rows = data["train"] + data["held_out"]
    for chosen_texts, rejected_texts in zip(calls[::2], calls[1::2]):
        for c, r in zip(chosen_texts, rejected_texts):
            c_ids, r_ids = tokenizer(c).input_ids, tokenizer(r).input_ids
            assert c_ids != r_ids  # no pair of one token sequence reaches the model
            assert len(c_ids) <= MAX_LENGTH and len(r_ids) <= MAX_LENGTH and c_ids[0] == BOS == r_ids[0]
            match = [x for x in rows if c.endswith(x["last"] + x["chosen"])]  # the whole last turn and answer
            assert match and r.endswith(match[0]["last"] + match[0]["rejected"]), (c, r)
    # eval_accuracy: ties half, against the labels (chosen is better here), from the scores the stage computed
    ((eval_rows, chosen, rejected),) = seen["evaluate"]
    assert len(eval_rows) == 11
    by_hand = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen.tolist(), rejected.tolist()))
    assert m["eval_accuracy"] == round(by_hand / 11, 4)
    assert m["tie_rate"] == round(sum(c == r for c, r in zip(chosen.tolist(), rejected.tolist())) / 11, 4)


def test_dpo_gets_whole_answers_with_eos(long_run, tokenizer):
    summary, seen, data = long_run
    assert summary["stages"][2]["metrics"]["dropped_pairs"] == {IDENTICAL: 4, RESPONSE_TOO_LONG: 0}
    assert len(seen["dpo"]) == 8
    for example in seen["dpo"]:
        row = check_prompt(tokenizer, example["prompt_ids"], data["train"], MAX_LENGTH)
        assert example["chosen_ids"] == ids(tokenizer, row["chosen"]) + [EOS]
        assert example["rejected_ids"] == ids(tokenizer, row["rejected"]) + [EOS]
        assert len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"])) <= MAX_LENGTH


def test_kto_gets_whole_completions_with_eos(long_run, tokenizer):
    summary, seen, data = long_run
    assert summary["stages"][3]["metrics"]["dropped_pairs"] == {IDENTICAL: 4, RESPONSE_TOO_LONG: 0}
    assert len(seen["kto"]) == 16  # two unpaired examples per pair
    for example in seen["kto"]:
        row = check_prompt(tokenizer, example["prompt_ids"], data["train"], MAX_LENGTH)
        answer = row["chosen"] if example["label"] else row["rejected"]
        assert example["completion_ids"] == ids(tokenizer, answer) + [EOS]
        assert len(example["prompt_ids"]) + len(example["completion_ids"]) <= MAX_LENGTH


def test_orpo_gets_whole_answers_with_eos(long_run, tokenizer):
    summary, seen, data = long_run
    assert summary["stages"][4]["metrics"]["dropped_pairs"] == {IDENTICAL: 4, RESPONSE_TOO_LONG: 0}
    assert len(seen["orpo"]) == 8
    for example in seen["orpo"]:
        row = check_prompt(tokenizer, example["prompt_input_ids"], data["train"], MAX_LENGTH)
        for key in ("chosen", "rejected"):
            answer = ids(tokenizer, row[key]) + [EOS]
            sequence, labels = example[f"{key}_input_ids"], example[f"{key}_labels"]
            assert len(sequence) <= MAX_LENGTH and sequence[-len(answer) :] == answer
            assert labels[-len(answer) :] == answer  # the answer and its eos are learned


def test_sft_gets_whole_completions_with_eos(long_run, tokenizer):
    summary, seen, data = long_run
    assert summary["stages"][0]["metrics"]["dropped_examples"] == {RESPONSE_TOO_LONG: 0}
    assert summary["stages"][0]["metrics"]["long_prompts_truncated"] == 8
    assert len(seen["sft"]) == 8
    for example in seen["sft"]:
        sequence, labels = example["input_ids"], example["labels"]
        assert sequence[0] == BOS and len(sequence) <= MAX_LENGTH
        start = max(i for i, label in enumerate(labels) if label == -100) + 1  # the completion starts here
        row = check_prompt(tokenizer, sequence[:start], data["train"], MAX_LENGTH)
        answer = ids(tokenizer, row["chosen"]) + [EOS]
        assert sequence[start:] == answer and labels[start:] == answer


def test_ppo_rolls_out_from_cut_prompts(long_run, tokenizer):
    summary, seen, data = long_run
    m = summary["stages"][5]["metrics"]
    assert m["long_prompts_truncated"] == 12  # every prompt is longer than the 128-token context less 8 new tokens
    assert len(seen["rollout"]) == 2
    for prompt_ids in seen["rollout"]:
        check_prompt(tokenizer, prompt_ids, data["held_out"], 128 - 8)


def test_ewc_dpo_on_a_pair_task_gets_whole_answers(toy_dir, tmp_path, tokenizer, monkeypatch):
    """A continual task given as prompt/chosen/rejected pairs, trained with EWC's DPO objective."""
    from alignment.config import config_from_dict
    from alignment.pipeline import Pipeline

    spy = Spy(monkeypatch)
    rows = transcripts(30, seed=7, identical_every=10)
    data = write_jsonl(tmp_path / "pairs_task.jsonl", rows, ("prompt", "chosen", "rejected"))
    stage = {"kind": "ewc", "data": data, "objective": "dpo", "fisher_samples": 2, **STEP, "max_samples": 8}
    raw = {"name": "ewc", "model": str(toy_dir / "model"), "output_dir": str(tmp_path), "stages": [stage],
           "continual": {"eval_samples": 4}, "logging": {"log_every": 50}}
    summary = Pipeline(*config_from_dict(raw)).run()
    m = summary["stages"][0]["metrics"]
    assert m["dropped_pairs"][IDENTICAL] >= 1 and m["dropped_pairs"][RESPONSE_TOO_LONG] == 0
    assert len(spy.seen["dpo"]) == 8
    for example in spy.seen["dpo"]:
        row = check_prompt(tokenizer, example["prompt_ids"], rows, MAX_LENGTH)
        assert example["chosen_ids"] == ids(tokenizer, row["chosen"]) + [EOS]
        assert example["rejected_ids"] == ids(tokenizer, row["rejected"]) + [EOS]
