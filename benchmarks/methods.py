"""Every fine-tuning method of the catalogue on the toy: one SFT stage each, from the config alone.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/methods.py                 # all methods, 1 epoch of toy:sft
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/methods.py --methods lora,full --epochs 0.5

Each method runs in its own process (so its peak memory is its own) and prints one JSON line; at the end a markdown
table: trainable parameters (%), SFT gold_reward and eval_loss, seconds per optimiser step, peak resident memory of
the process (torch and the interpreter included: ~0.5-0.7 GB of it is the same for every method) and the
training-state bytes the method adds (trainable weights + gradients + two AdamW moments, fp32).
The learning rates below are the usual starting points per family (not tuned on the toy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

LEARNING_RATES = {
    "lora": 1e-3, "rslora": 1e-3, "dora": 1e-3, "qlora": 1e-3, "ia3": 1e-2, "prefix": 1e-2, "prompt": 3e-2,
    "ptuning": 1e-2, "bottleneck": 1e-3, "mam": 1e-3, "full": 3e-4, "freeze": 3e-4, "head": 1e-3, "modules": 3e-4,
    "bitfit": 1e-2,
}


def run_one(method: str, epochs: float, out: Path) -> dict:
    from alignment.config import config_from_dict
    from alignment.methods import count_trainable, default_options
    from alignment.pipeline import Pipeline
    from alignment.policy import resolve_model_path

    options = default_options(method)
    raw = {"name": f"methods_{method}", "model": "toy", "seed": 0, "output_dir": str(out),
           "adapter": options.model_dump(), "logging": {"log_every": 1000},
           "stages": [{"kind": "sft", "data": "toy:sft", "epochs": epochs, "batch_size": 16,
                       "learning_rate": LEARNING_RATES[method]}]}
    summary = Pipeline(config_from_dict(raw)[0]).run()
    stage = summary["stages"][0]
    lines = [json.loads(x) for x in (out / raw["name"] / "0-sft" / "metrics.jsonl").read_text().splitlines()]
    train = next(x for x in lines if "train_runtime" in x)
    trainable, total, _, _ = count_trainable(resolve_model_path("toy"), options)
    return {
        "method": method,
        "learning_rate": LEARNING_RATES[method],
        "trainable": trainable,
        "trainable_percent": round(100 * trainable / total, 2),
        "gold_reward": stage["metrics"].get("gold_reward"),
        "eval_loss": stage["metrics"].get("eval_loss"),
        "base_gold_reward": summary.get("base_gold_reward"),
        "steps": train["step"],
        "s_per_step": round(train["train_runtime"] / train["step"], 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "train_state_mb": round(trainable * 4 * 4 / 2**20, 2),
    }


def table(rows: list[dict]) -> str:
    lines = ["| method | lr | trainable % | SFT gold_reward | eval_loss | s/step | peak RSS (MB) | "
             "training state (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['learning_rate']:g} | {r['trainable_percent']:.2f} | {r['gold_reward']} | "
                     f"{r['eval_loss']} | {r['s_per_step']:.3f} | {r['peak_rss_mb']:.0f} | {r['train_state_mb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    from alignment.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(run_one(args.one, args.epochs, Path(out))))
        return
    rows = []
    for method in args.methods.split(","):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        done = subprocess.run([sys.executable, __file__, "--one", method, "--epochs", str(args.epochs)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
