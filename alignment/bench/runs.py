"""Real pipeline runs for the stage benchmarks (ppo, memory, compare-trl): one YAML per run under ``DIR/configs``.

Every run is named ``bench-<size>`` and starts with the same two short preparation stages (a few SFT steps for the
`policy` adapter, a few reward-model steps for the same-base `reward` adapter), so the pipeline's own caching
trains them once per ``DIR`` and later runs skip them; only the measured stage (index 2) runs again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from alignment.bench.common import bench_model

PREP_STAGES = [
    {"kind": "sft", "data": "toy:sft", "max_samples": 64, "max_steps": 2, "batch_size": 8, "eval_fraction": 0.0},
    {"kind": "reward", "data": "toy:preference", "max_samples": 64, "max_steps": 2, "batch_size": 8,
     "eval_data": "toy:preference_eval"},
]
MEASURED = 2  # index of the measured stage


def write_config(bench, label: str, stages: list[dict], measured: bool = True, **top: Any) -> Path:
    """``DIR/configs/<label>.yaml``: the bench model in the bench's dtype, LoRA r=16, then ``stages``. With
    ``measured`` the last stage's folder is removed, so the pipeline runs it again instead of skipping it."""
    from alignment.pipeline import stage_dirname

    out = bench.out
    config = {"name": f"bench-{bench.size}", "model": str(bench_model(bench.size)), "dtype": bench.dtype,
              "output_dir": str(Path(out) / "runs"), "logging": {"log_every": 1000}, **top, "stages": stages}
    path = Path(out) / "configs" / f"{label}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    if measured:
        last = len(stages) - 1
        folder = Path(out) / "runs" / config["name"] / stage_dirname(last, stages[last]["kind"])
        shutil.rmtree(folder, ignore_errors=True)
    return path


def run_config(path: Path) -> dict:
    from alignment.pipeline import Pipeline

    return Pipeline.from_yaml(path).run()


def run_config_process(path: Path) -> None:
    """``alignment run path`` in a fresh process: what one measured stage leaves in the heap (freed memory the
    allocator keeps) cannot shrink the memory vLLM finds free when the next one starts its engine."""
    import os
    import subprocess
    import sys

    from alignment.errors import UserError

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                         os.environ.get("PYTHONPATH")]))}
    log = path.with_suffix(".log")
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "alignment", "run", str(path)], stdout=out,
                              stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise UserError(f"bench: `alignment run {path}` failed (exit {code}); see {log}")


def online_stage(kind: str, iterations: int, **fields: Any) -> dict:
    """An online stage that neither checkpoints nor evaluates while it is measured."""
    return {"kind": kind, "iterations": iterations, "checkpoint_every": 10_000, "sync_check_every": 10_000, **fields}


def iteration_records(out: Path, size: str, kind: str) -> list[dict]:
    """metrics.jsonl of the measured stage, each line with ``wall_s``: seconds since the previous line."""
    from alignment.pipeline import stage_dirname

    path = Path(out) / "runs" / f"bench-{size}" / stage_dirname(MEASURED, kind) / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    previous = 0.0
    for line in lines:
        line["wall_s"], previous = line["time_s"] - previous, line["time_s"]
    return lines


def deltas(records: list[dict], key: str) -> list[float]:
    """Per-iteration values of a cumulative ``time_*`` key."""
    values = [r[key] for r in records]
    return [b - a for a, b in zip([0.0] + values[:-1], values)]
