"""`alignment bench toy`: the toy world's calibration table, one row per world.

Each world (``model: toy:N``) is built (or read from the cache: ``build_s`` is then the recorded build time), then the
shipped configs run on it unchanged, as the test suite runs them on world 0:

    sft, reward, ppo   configs/sft_rm_ppo.yaml      SFT gold, reward-model eval accuracy, PPO gold
    grpo, rloo         configs/sft_grpo.yaml, sft_rm_rloo.yaml: on that run's SFT and reward model (skipped stages)
    dpo                configs/sft_dpo.yaml          DPO gold (its SFT stage is the same: reused, not retrained)
    kto, orpo          configs/sft_kto.yaml, sft_orpo.yaml: on that run's SFT
    continual          configs/continual_seq.yaml, continual_ewc.yaml, continual_fusion.yaml: each chain's BWT

The tests' learning-quality thresholds are stated against this table (worlds, training seeds and thread counts stand
in for the float rounding of other CPUs); ``--worlds``, ``--seeds`` and ``--runs`` choose a quicker subset,
``--threads`` the torch threads. Run folders go to ``DIR/runs/world-N-seed-S``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from alignment.bench.common import Report

RUNS = ("sft", "reward", "ppo", "grpo", "rloo", "dpo", "kto", "orpo", "continual")
CONTINUES = {"grpo": ("sft_grpo", "sft_rm_ppo"), "rloo": ("sft_rm_rloo", "sft_rm_ppo"), "kto": ("sft_kto", "sft_dpo"),
             "orpo": ("sft_orpo", "sft_dpo")}  # kind: (its config, the run whose earlier stages it reuses)
REPO = Path(__file__).resolve().parents[2]
CONTINUAL = ("seq", "ewc", "fusion")
COLUMNS = ["world", "seed", "threads", "build_s", "attempts", "noun_copy", "base_gold", "sft_gold", "rm_eval_accuracy", "rm_length_baseline", "ppo_gold",
           "grpo_gold", "rloo_gold", "dpo_gold", "kto_gold", "orpo_gold", "seq_bwt", "ewc_bwt", "fusion_bwt", "seq_final", "ewc_final", "fusion_final", "seconds"]


def _metric(summary: dict, index: int, key: str):
    return summary["stages"][index]["metrics"].get(key)


def world_row(world: int, seed: int, threads: int, runs: list[str], out: Path) -> dict:
    from alignment.toy.build import ensure_toy

    started = time.perf_counter()
    built = json.loads((ensure_toy(world) / "world.json").read_text())
    row = {"world": world, "seed": seed, "threads": threads, "build_s": built["seconds"], "attempts": len(built.get("attempts", [])),
           "noun_copy": built["gate"]["noun_copy"], "base_gold": built["gate"]["gold_reward"]}
    out = out / f"world-{world}-seed-{seed}"
    if {"sft", "reward", "ppo", "grpo", "rloo"} & set(runs):
        last = 2 if "ppo" in runs else 1 if {"reward", "grpo", "rloo"} & set(runs) else 0  # up to the last chosen stage
        summary = _pipeline("sft_rm_ppo", world, seed, out, n_stages=last + 1)
        row["sft_gold"] = _metric(summary, 0, "gold_reward")
        if last >= 1:
            row["rm_eval_accuracy"] = _metric(summary, 1, "eval_accuracy")
            row["rm_length_baseline"] = _metric(summary, 1, "length_baseline_accuracy")
        if last >= 2:
            row["ppo_gold"] = _metric(summary, 2, "gold_reward")
    if {"dpo", "kto", "orpo"} & set(runs):
        sft = out / "sft_rm_ppo" / "0-sft"
        if sft.exists():  # the same SFT stage: the pipeline skips it by its fingerprint (retrains if it differs)
            shutil.copytree(sft, out / "sft_dpo" / "0-sft", dirs_exist_ok=True)
        summary = _pipeline("sft_dpo", world, seed, out, n_stages=None if "dpo" in runs else 1)
        if "dpo" in runs:
            row["dpo_gold"] = _metric(summary, 1, "gold_reward")
        row.setdefault("sft_gold", _metric(summary, 0, "gold_reward"))
    for kind in ("grpo", "rloo", "kto", "orpo"):
        if kind in runs:  # under the earlier run's name, so its stages are skipped and only this one trains
            config, earlier = CONTINUES[kind]
            summary = _pipeline(config, world, seed, out, f"name={earlier}")
            row[f"{kind}_gold"] = _metric(summary, len(summary["stages"]) - 1, "gold_reward")
    if "continual" in runs:
        for name in CONTINUAL:
            block = _pipeline(f"continual_{name}", world, seed, out)["continual"]
            row[f"{name}_bwt"] = None if block["bwt"] is None else round(block["bwt"], 4)
            row[f"{name}_final"] = "/".join(f"{v:.2f}" for v in block["acc_matrix"][-1])
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _pipeline(config: str, world: int, seed: int, out: Path, *overrides: str, n_stages: int | None = None) -> dict:
    """Run a shipped config on world ``world`` with training seed ``seed`` under ``out`` (its first ``n_stages``
    stages: a cut copy of it)."""
    import yaml

    from alignment.pipeline import Pipeline

    path = REPO / "configs" / f"{config}.yaml"
    if n_stages is not None:
        data = yaml.safe_load(path.read_text())
        data["stages"] = data["stages"][:n_stages]
        path = out / "configs" / f"{config}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return Pipeline.from_yaml(path, [f"model=toy:{world}", f"seed={seed}", f"output_dir={out}", "logging.log_every=1000",
                                     *overrides]).run()


def run(bench, worlds: list[int], seeds: list[int], runs: list[str]) -> Report:
    from alignment.metrics import console

    report = Report("toy", "The toy world's calibration: worlds 0-4 stand in for other CPUs' float rounding",
                    {"worlds": worlds, "seeds": seeds, "runs": runs, "threads": bench.threads}, COLUMNS)
    for world in worlds:
        for seed in seeds:
            row = world_row(world, seed, bench.threads, runs, bench.out / "runs")
            console.print("toy world " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("world", "seed"))
                          + f" (world {world}, seed {seed})")
            report.rows.append(row)
    report.notes.append("build_s: the recorded build time of the cached world (this run's if it built it); "
                        "base_gold: the gate's figure on the held-out prompts; *_final: the chain's last accuracy row "
                        "(sentiment/topic/number).")
    return report
