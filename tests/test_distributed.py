"""Multi-process training through accelerate: 2 CPU processes (gloo), data parallel, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


def test_two_process_sft_reward_dpo_shard_the_data_and_only_rank_0_writes(tmp_path, toy_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    config = tmp_path / "chain.yaml"
    config.write_text("name: ddp\nrollout: {engine: hf}\nstages:\n  - kind: sft\n    max_steps: 6\n"
                      "  - kind: reward\n    max_steps: 8\n  - kind: dpo\n    max_steps: 3\n    sft_weight: 1.0\n"
                      "  - kind: ppo\n    iterations: 2\n    batch_size: 4\n    minibatch_size: 4\n    max_new_tokens: 8\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "alignment", "run", str(config), f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no GPU here: accelerate's launcher starts 2 processes and they join a gloo process group
    shards = re.findall(r"rank (\d)/2: trained on (\d+) examples \(digest (\w+)\)", proc.stderr)
    by_stage = [shards[i : i + 2] for i in range(0, len(shards), 2)]
    assert len(shards) == 4, proc.stderr[-3000:]  # SFT and DPO (TRL trainers), both ranks
    for pair in by_stage:
        assert {r for r, _, _ in pair} == {"0", "1"} and all(int(n) > 0 for _, n, _ in pair)
        assert pair[0][2] != pair[1][2]  # different examples on each rank
    # our own reward loop runs in DDP too: each rank sees its share, the weights stay identical
    reward = re.findall(r"rank (\d)/2: trained on (\d+) pairs \(weights checksum ([-\d.]+)\)", proc.stderr)
    assert sorted(r for r, _, _ in reward) == ["0", "1"] and reward[0][1] == reward[1][1] == "128"  # 8 steps x 16
    assert reward[0][2] == reward[1][2]
    # PPO in data parallel: each rank rolls out its own share of the prompts, the averaged gradients keep the weights equal
    ppo = re.findall(r"rank (\d)/2: ppo on (\d+) prompts \(digest (\w+), policy checksum ([-\d.]+)\)", proc.stderr)
    assert sorted(r for r, *_ in ppo) == ["0", "1"] and ppo[0][1] == ppo[1][1] == "8"  # 2 iterations x 4 prompts
    assert ppo[0][2] != ppo[1][2] and ppo[0][3] == ppo[1][3]
    run = tmp_path / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["done"] * 4
    # rank 1 printed nothing and wrote nothing: one console line per stage, one metrics line per logged step
    for done in ("stage 0 (sft) done", "stage 1 (reward) done", "stage 2 (dpo) done", "stage 3 (ppo) done"):
        assert proc.stderr.count(done) == 1, done
    assert (run / "1-reward" / "reward_model" / "adapter_model.safetensors").is_file()
    for stage in ("0-sft", "1-reward", "2-dpo", "3-ppo"):
        records = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert len({(r["step"], tuple(sorted(r))) for r in records}) == len(records)  # no record written twice
    for entry in summary["stages"]:
        for folder in entry["artifacts"].values():
            assert (run / folder).exists(), folder
    assert not list(run.rglob(".*.tmp")) and not list(Path("/tmp").glob("alignment-rank-scratch-*"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_configs_are_valid_accelerate_configs(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert str(config.distributed_type).split(".")[-1] in {"MULTI_GPU", "DEEPSPEED", "FSDP"}
    assert config.num_processes >= 2 and config.mixed_precision == "bf16"
    assert f"accelerate launch --config_file configs/accelerate/{path.name}" in path.read_text()


def _launch(config: Path, cwd: Path, *overrides: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` of 2 CPU processes (gloo) on a free port; ``kill_at``: both ranks SIGKILL themselves
    at that point (alignment/faults.py), as a pre-empted machine would kill them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("ALIGNMENT_TEST_KILL_AT", None)
    if kill_at:
        env["ALIGNMENT_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "alignment", "run", str(config), *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_two_process_run_killed_in_reward_and_ppo_resumes_to_the_same_result(tmp_path, toy_dir):
    """Data parallel stages of our own loops checkpoint too: rank 0 writes, with every rank's own state (torch and
    Python RNGs, the running reward normaliser, counters), and every rank resumes from it. Kill -9 both ranks inside
    the reward stage, then inside PPO; the rerun ends with the numbers, logs and weights of an uninterrupted run."""
    from tests.test_resume import logged, without_timing

    config = tmp_path / "ddp.yaml"
    config.write_text(
        "name: ddp\nrollout: {engine: hf}\nlogging: {log_every: 1}\nstages:\n  - kind: sft\n    max_steps: 2\n"
        "  - kind: reward\n    max_steps: 4\n    checkpoint_every: 2\n"
        "  - kind: ppo\n    iterations: 3\n    batch_size: 4\n    minibatch_size: 4\n    max_new_tokens: 8\n"
        "    checkpoint_every: 1\n    reward_normalization: running\n")
    out = f"output_dir={tmp_path}"
    ref = _launch(config, tmp_path, out, "name=reference")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _launch(config, tmp_path, out, kill_at="1-reward:step:3")  # after step 3, before its checkpoint
    assert killed.returncode != 0 and "stage 1 (reward) done" not in killed.stderr, killed.stderr[-3000:]
    killed = _launch(config, tmp_path, out, kill_at="2-ppo:step:2")
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert "resuming 1-reward from iter-00002" in killed.stderr and "stage 1 (reward) done" in killed.stderr
    final = _launch(config, tmp_path, out)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming 2-ppo from iter-00001" in final.stderr

    run, reference = tmp_path / "ddp", tmp_path / "reference"
    got, want = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert [s["status"] for s in got["stages"]] == ["skipped", "skipped", "done"]
    for g, w in zip(got["stages"], want["stages"]):
        assert without_timing(g["metrics"]) == without_timing(w["metrics"]), g["dir"]
    for stage in ("1-reward", "2-ppo"):
        assert logged(run / stage) == logged(reference / stage), stage
    # each rank trained on the same prompts and ended with the same weights as in the uninterrupted run
    ranks = r"rank (\d)/2: ppo on (\d+) prompts \(digest (\w+), policy checksum ([-\d.]+)\)"
    assert sorted(re.findall(ranks, final.stderr)) == sorted(re.findall(ranks, ref.stderr))
    assert len(re.findall(ranks, final.stderr)) == 2
    reward = r"rank (\d)/2: trained on (\d+) pairs \(weights checksum ([-\d.]+)\)"
    assert sorted(re.findall(reward, killed.stderr)) == sorted(re.findall(reward, ref.stderr))
    for name in ("1-reward/reward_model", "2-ppo/adapters/policy"):
        for f in (run / name).glob("*.safetensors"):
            assert f.read_bytes() == (reference / name / f.name).read_bytes(), f
