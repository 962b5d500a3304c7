"""GRPO and RLOO (critic-free online stages on the shared rollout engines) and KTO / ORPO (TRL trainers), on the toy.

Each test continues from a copy of an earlier session run, so SFT and the reward model are trained once: the copied
stages are skipped (same config, same fingerprints) and only the new stage runs.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import REPO, expect_gain, run_cli


def _continue(run_dir, tmp_path, config: str, *overrides: str) -> dict:
    """Run ``config`` under the copied run's name, so its unchanged stages are skipped; returns summary.json."""
    shutil.copytree(run_dir, tmp_path / run_dir.name)
    proc = run_cli("run", str(REPO / "configs" / config), f"name={run_dir.name}", f"output_dir={tmp_path}", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / run_dir.name / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"][:-1]] == ["skipped"] * (len(summary["stages"]) - 1)
    return summary


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_critic_free_stages_raise_the_learned_reward_with_vllm(ppo_run, tmp_path, kind):
    _, _, run_dir = ppo_run
    config = {"grpo": "sft_grpo.yaml", "rloo": "sft_rm_rloo.yaml"}[kind]
    summary = _continue(run_dir, tmp_path, config)
    stage = summary["stages"][2]
    m = stage["metrics"]
    assert stage["kind"] == kind and stage["engine"] == "vllm" and stage["sync_mode"] == "merged"
    assert m["sync_logprob_diff_mean"] <= 0.05 and m["samples_per_s"] > 0 and "gold_reward" in m
    lines = [json.loads(x) for x in (tmp_path / run_dir.name / f"2-{kind}" / "metrics.jsonl").read_text().splitlines()]
    first, last = [x["reward"] for x in lines[:10]], [x["reward"] for x in lines[-10:]]
    assert sum(last) / 10 > sum(first) / 10 + 0.3  # the learned reward rises (measured ~0.0 -> ~0.5)
    for key in ("reward", "kl", "kl_loss", "entropy", "approx_kl", "clipfrac", "reward_std_in_group", "time_generate"):
        assert key in lines[-1], key
    assert "value" not in stage["artifacts"]  # no critic
    # gold follows the learned reward: the target is +0.20 over SFT (toy v15: 0.551 -> 0.939 GRPO, 0.906 RLOO)
    sft = summary["stages"][0]["metrics"]
    expect_gain(m["gold_reward"], sft["gold_reward"], 0.20, f"{kind.upper()} gold over SFT")


def test_grpo_is_one_override_away_from_ppo():
    proc = run_cli("validate", str(REPO / "configs" / "sft_rm_ppo.yaml"), "stages.2.kind=grpo")
    assert proc.returncode == 0, proc.stderr
    assert "ok (3 stages: sft -> reward -> grpo)" in proc.stdout  # every PPO field the file sets exists in GRPO
    proc = run_cli("validate", str(REPO / "configs" / "sft_rm_ppo.yaml"), "stages.2.kind=grpo", "stages.2.vf_coef=1")
    assert proc.returncode == 0 and "dropped fields it does not have: vf_coef" in proc.stderr


def test_grpo_on_the_hf_engine_without_kl(tmp_path):
    cfg = tmp_path / "g.yaml"
    cfg.write_text(
        f"name: g\noutput_dir: {tmp_path}/runs\nrollout: {{engine: hf}}\nstages:\n"
        "  - kind: sft\n    max_steps: 20\n"
        "  - kind: grpo\n    reward: toy_gold\n    iterations: 2\n    batch_size: 4\n    group_size: 3\n"
        "    minibatch_size: 6\n    kl_coef: 0.0\n    scale_rewards: false\n"
    )
    proc = run_cli("run", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = json.loads((tmp_path / "runs" / "g" / "summary.json").read_text())["stages"][1]
    assert stage["engine"] == "hf" and stage["status"] == "done"
    lines = (tmp_path / "runs" / "g" / "1-grpo" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["kl_loss"] == 0.0


@pytest.mark.parametrize("kind", ["kto", "orpo"])
def test_offline_objectives(dpo_run, tmp_path, kind):
    _, _, run_dir = dpo_run
    summary = _continue(run_dir, tmp_path, f"sft_{kind}.yaml")
    sft, stage = summary["stages"][0]["metrics"], summary["stages"][1]
    assert stage["kind"] == kind and stage["artifacts"]["policy"] == f"1-{kind}/adapters/policy"
    m = stage["metrics"]
    if kind == "kto":  # TRL's frozen `ref` is still exactly the SFT adapter
        assert m["reference_max_abs_diff"] == 0.0
        assert m["train_desirable"] == m["train_undesirable"] == 1900
    expect_gain(m["gold_reward"], sft["gold_reward"], 0.10, f"{kind.upper()} gold over SFT")  # toy v14: 0.44 -> 0.88


def test_kto_takes_unpaired_rows_and_names_bad_labels(tmp_path):
    good = tmp_path / "unpaired.jsonl"
    rows = [{"prompt": "review of the soup in rome :", "completion": " the soup was good .", "label": True},
            {"prompt": "review of the tea in oslo :", "completion": " the tea was bad .", "label": False}] * 8
    good.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tmp_path / "k.yaml"
    cfg.write_text(f"name: k\noutput_dir: {tmp_path}/runs\nstages:\n  - kind: sft\n    max_steps: 5\n"
                   f"  - kind: kto\n    data: {good}\n    max_steps: 2\n    batch_size: 4\n")
    proc = run_cli("run", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "runs" / "k" / "summary.json").read_text())["stages"][1]["metrics"]
    assert (m["train_desirable"], m["train_undesirable"]) == (8, 8)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p :", "completion": " c .", "label": "maybe"}))
    proc = run_cli("run", str(cfg), f"stages.1.data={bad}")
    assert proc.returncode == 2
    assert f"stages.1.data: '{bad}' line 1: label must be true/false" in proc.stderr
