"""Reward model and DPO on the real toy model with real trainers."""

from __future__ import annotations

import json

import pytest
import torch

from alignment.errors import UserError
from tests.conftest import expect_gain, run_cli


def test_reward_model_beats_length_baseline(reward_run):
    _, summary, _ = reward_run
    stage = summary["stages"][1]
    assert stage["kind"] == "reward" and stage["status"] == "done"
    m = stage["metrics"]
    assert {"eval_accuracy_noisy", "length_baseline_accuracy", "dropped_pairs"} <= set(m)
    assert stage["artifacts"]["reward_model"] == "1-reward/reward_model"
    # the target, +0.15 over "the longer answer wins"; toy v17 measured +0.31 to +0.43 on worlds 0-3
    # (docs/benchmarks.md, `alignment bench toy`): a margin of at least 0.16 on every world measured
    assert m["eval_accuracy"] >= m["length_baseline_accuracy"] + 0.15, m


def test_reward_artifact_round_trip_through_stock_transformers_and_peft(reward_run, toy_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from reward_models import TrainedRewardModel

    pipeline, _, run_dir = reward_run
    folder = run_dir / "1-reward" / "reward_model"
    ours = TrainedRewardModel.load(folder, policy=pipeline.policy())
    prompts = ["review of the soup in paris :", "review of the bike in oslo :", "review of the tea in rome :"]
    completions = [" the soup was good and fresh .", " the bike was bad .", " the tea was nice and warm and tasty ."]
    scores = ours.score(prompts, completions)
    stock = AutoModelForSequenceClassification.from_pretrained(toy_dir / "model", num_labels=1)
    stock = PeftModel.from_pretrained(stock, folder).eval()
    tok = pipeline.policy().tokenizer
    with torch.no_grad():
        for p, c, s in zip(prompts, completions, scores):
            logit = stock(**tok([p + c], return_tensors="pt")).logits[0, 0].item()
            assert logit == pytest.approx(s.item(), abs=1e-4)
    # the reward model ranks a clearly better answer higher
    better = ours.score(prompts[:1] * 2, [" the soup was good and fresh and nice .", " the soup was bad and cold ."])
    assert better[0] > better[1]


def test_eval_pairs_cli(reward_run, tmp_path):
    _, summary, run_dir = reward_run
    out = tmp_path / "r.json"
    proc = run_cli("eval", "pairs", "--reward", str(run_dir / "1-reward" / "reward_model"), "--data", "toy:preference_eval",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["pairs"] == 256
    assert result["gold_accuracy"] == pytest.approx(summary["stages"][1]["metrics"]["eval_accuracy"], abs=0.01)


def test_reward_adapter_on_another_base_is_refused(reward_run, tmp_path):
    import shutil

    _, _, run_dir = reward_run
    folder = tmp_path / "rm"
    shutil.copytree(run_dir / "1-reward" / "reward_model", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    other = tmp_path / "other-base"
    shutil.copytree(config["base_model_name_or_path"], other)
    proc = run_cli("eval", "pairs", "--reward", str(folder), "--data", "toy:preference_eval")
    assert proc.returncode == 0
    from alignment.policy import SharedPolicy
    from reward_models import TrainedRewardModel

    with pytest.raises(UserError, match="adapter was trained on base"):
        TrainedRewardModel.load(folder, policy=SharedPolicy.load(str(other)))


def test_dpo_beats_sft(dpo_run):
    _, summary, _ = dpo_run
    sft, dpo = summary["stages"][0]["metrics"], summary["stages"][1]["metrics"]
    assert summary["stages"][1]["artifacts"] == {"policy": "1-dpo/adapters/policy"}
    assert "gold_win_rate" in dpo
    # the target, +0.15 over SFT; toy v17 measured SFT 0.65 -> DPO 1.0 / 0.834 on worlds 0-1 only
    # (docs/benchmarks.md): not yet proven on every world, so a miss xfails with its figures
    expect_gain(dpo["gold_reward"], sft["gold_reward"], 0.15, "DPO gold over SFT")


def test_dpo_reference_is_the_frozen_sft_policy(dpo_run, toy_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignment.evaluation import completion_logprobs

    pipeline, summary, run_dir = dpo_run
    assert summary["stages"][1]["metrics"]["reference_max_abs_diff"] == 0.0  # ref weights == SFT weights, after training
    check = json.loads((run_dir / "1-dpo" / "reference_check.json").read_text())
    rows = check["rows"]
    tok = pipeline.policy().tokenizer

    def logps(adapter_dir):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_dir / "model"), adapter_dir).eval()
        return completion_logprobs(model, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows])

    sft = logps(run_dir / "0-sft" / "adapters" / "policy")
    assert check["reference_logprobs"] == pytest.approx(sft, abs=1e-4)
    base = completion_logprobs(AutoModelForCausalLM.from_pretrained(toy_dir / "model").eval(), tok,
                               [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    assert check["reference_logprobs"] != pytest.approx(base, abs=1e-2)  # not the bare base
    assert logps(run_dir / "1-dpo" / "adapters" / "policy") != pytest.approx(sft, abs=1e-3)  # the policy moved


# ------------------------------------------------------------------------------------------ bad preference input


def test_preference_formats(tmp_path, toy_dir):
    from alignment.data import preference_rows
    from alignment.policy import load_tokenizer

    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "Human: hi there Assistant: hello friend", "rejected": "Human: hi there Assistant: go away"}) + "\n")
    rows, dropped = preference_rows(str(hh), None)
    assert rows == [{"prompt": "Human: hi there Assistant:", "chosen": " hello friend", "rejected": " go away"}]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
                                "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}) + "\n")
    rows, _ = preference_rows(str(chat), None, tokenizer=load_tokenizer(str(toy_dir / "model")))
    assert rows == [{"prompt": "user : hi\nassistant : ", "chosen": " yes", "rejected": " no"}]


def test_bad_preference_files_exit_2(tmp_path):
    cases = {
        "cols.jsonl": (json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n", "columns found: bad, good, question"),
        "empty.jsonl": ("", "holds no rows"),
        "same.jsonl": (json.dumps({"prompt": "p", "chosen": " a", "rejected": " a "}) + "\n", "every pair"),
    }
    for name, (text, needle) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"name: bad\noutput_dir: {tmp_path}/runs\nstages:\n  - kind: sft\n    max_steps: 1\n"
                       f"  - kind: dpo\n    data: {path}\n")
        proc = run_cli("run", str(cfg))
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: stages.1.data:") and needle in last, (name, last)
        assert "Traceback" not in proc.stderr
