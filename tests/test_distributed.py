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
