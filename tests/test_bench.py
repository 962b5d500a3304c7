"""Smoke tests: every benchmark runs at a tiny size and writes its JSON, markdown table and chart.

Figures are not asserted (benchmarks print figures; speed goals are never timed tests); what is asserted are
relations that hold on any machine. One output folder is shared so the PPO, memory and compare-trl runs train
the preparation stages (SFT, reward) once.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alignment.bench import Options, run_benchmark
from alignment.bench.memory import PeakSampler, process_tree, pss_bytes
from alignment.errors import UserError

TINY = dict(size="tiny", repeats=1, threads=1, batch=4, new_tokens=4)


@pytest.fixture(scope="module")
def out(tmp_path_factory, toy_dir):
    return tmp_path_factory.mktemp("bench")


def result(out, name: str) -> dict:
    assert (out / f"{name}.md").read_text().startswith("# ")
    assert (out / f"{name}.png").stat().st_size > 1000
    payload = json.loads((out / f"{name}.json").read_text())
    assert len(payload["loadavg_start"]) == 3 and payload["machine"]["cores"] >= 1
    return payload


def test_rollout_and_sync_with_real_engines(out):
    pytest.importorskip("vllm")
    # one engine start each (the other mode is the same code with another argument)
    run_benchmark("rollout", Options(out, batches="2", engines="hf,vllm-merged", **TINY))
    rows = result(out, "rollout")["rows"]
    assert [r["implementation"] for r in rows] == ["model.generate (raw)", "model.generate (raw)", "HFEngine (ours)",
                                                   "LLM.generate (raw vLLM)", "VLLMEngine (ours, merged)"]
    assert all(0 < r["min"] <= r["tok_s"] <= r["max"] for r in rows)

    run_benchmark("sync", Options(out, ranks="8", engines="vllm-lora", **TINY))
    (row,) = result(out, "sync")["rows"]
    assert (row["mode"], row["rank"]) == ("lora", 8)
    assert row["to_first_token_s"] >= row["sync_call_s"] > 0  # the time to the first token includes the sync call


def test_ppo_time_split(out):
    run_benchmark("ppo", Options(out, engines="hf", **TINY))
    (row,) = result(out, "ppo")["rows"]
    parts = ("generate_s", "score_s", "policy_forward_s", "reference_forward_s", "value_forward_s", "train_s")
    assert all(row[p] > 0 for p in parts) and row["sync_s"] == 0.0  # the HF engine shares the weights: no sync
    assert row["samples_s"] == pytest.approx(4 / row["iteration_s"])


def test_memory_of_a_ppo_run(out):
    import time

    start = time.time()
    run_benchmark("memory", Options(out, runs="ppo-hf", **TINY))  # the other runs are the same code, other commands
    (row,) = result(out, "memory")["rows"]
    assert row["run"] == "ppo-hf" and row["peak_pss_mib"] > 200  # a Python process with torch and a model loaded
    # it really ran: the pipeline did not skip it as unchanged after test_ppo_time_split's identical stage
    done = json.loads((out / "runs" / "bench-tiny" / "2-ppo" / "DONE").read_text())
    assert done["finished_at"] > start


def test_compare_trl(out):
    run_benchmark("compare-trl", Options(out, engines="hf", **{**TINY, "batch": 8}))  # 2 prompts x 4
    rows = {r["trainer"]: r for r in result(out, "compare_trl")["rows"]}
    assert set(rows) == {"ours PPO", "ours PPO (critic shared)", "ours GRPO", "ours RLOO", "TRL GRPOTrainer",
                         "TRL RLOOTrainer"}
    assert rows["TRL GRPOTrainer"]["vs_trl_grpo"] == 1.0


def test_pss_is_summed_over_the_process_tree():
    grandchild = "import time; x = bytearray(50_000_000); time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    child = subprocess.Popen([sys.executable, "-c", parent])
    try:
        sampler = PeakSampler(child.pid, interval=0.05)
        child.wait()
        assert sampler.stop() > 50_000_000  # the grandchild's 50 MB buffer was counted
    finally:
        child.kill()
    import os

    assert os.getpid() in process_tree(os.getpid()) and pss_bytes(os.getpid()) > 0
    assert pss_bytes(2**22 + 12345) == 0  # a process that does not exist


@pytest.mark.parametrize("what, options, message", [
    ("rollout", dict(size="huge"), "--size"),
    ("rollout", dict(batches="8,x"), "--batches"),
    ("ppo", dict(engines="vllm"), "--engines"),
    ("memory", dict(runs="sft,gpu"), "--runs"),
    ("sync", dict(threads=999), "--threads"),
    ("toy", dict(runs="sft,gpu"), "--runs"),
    ("toy", dict(worlds="0,-1"), "--worlds"),
    ("toy", dict(seeds="x"), "--seeds"),
])
def test_bad_options_are_one_line_errors(tmp_path, what, options, message):
    with pytest.raises(UserError, match=message):
        run_benchmark(what, Options(tmp_path, **options))
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_toy_calibration_row(tmp_path, toy_dir):
    """`alignment bench toy` on world 0, SFT only: one row with the build gate's figures and the SFT gold of the
    shipped chain's SFT stage (the full table: docs/benchmarks.md)."""
    paths = run_benchmark("toy", Options(tmp_path, threads=1, worlds="0", runs="sft"))
    payload = json.loads((tmp_path / "toy.json").read_text())
    (row,) = payload["rows"]
    built = json.loads((toy_dir / "world.json").read_text())
    assert row["world"] == 0 and row["noun_copy"] == built["gate"]["noun_copy"] and row["attempts"] >= 1
    assert (row["seed"], row["threads"]) == (0, 1)
    assert row["sft_gold"] > row["base_gold"] and "ppo_gold" not in row
    assert (tmp_path / "toy.md").read_text().startswith("# ") and tmp_path / "toy.md" in paths
