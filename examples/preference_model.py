"""Train a preference (reward) model on your own pairs, then score new answers with it.

    python examples/preference_model.py [--quick]

Your file needs `prompt`, `chosen`, `rejected` columns (jsonl, json, csv or parquet); this example writes a small one
from the toy language so that it runs anywhere.
"""

import argparse
import json
from pathlib import Path

from alignment.pipeline import Pipeline
from reward_models import TrainedRewardModel

PAIRS = [
    ("review of the soup in rome :", " the soup was good and fresh .", " the soup was cold ."),
    ("review of the bus in oslo :", " the bus was clean and calm .", " the bus was slow and noisy ."),
    ("review of the tea in lima :", " the tea was warm and sweet .", " the tea was bitter ."),
    ("review of the bed in cairo :", " the bed was clean .", " the bed was dirty and broken ."),
] * 16

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default="runs")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs_file = out / "my_pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    config = out / "my_reward.yaml"
    config.write_text(
        f"name: example_reward\nmodel: toy\noutput_dir: {out}\nstages:\n"
        f"  - kind: reward\n    data: {pairs_file}\n    epochs: {1 if args.quick else 3}\n    eval_fraction: 0.25\n"
    )
    summary = Pipeline.from_yaml(config).run()
    folder = out / "example_reward" / summary["stages"][0]["artifacts"]["reward_model"]
    model = TrainedRewardModel.load(folder)  # on the base the folder records
    scores = model.score(["review of the cake in rome :"] * 2, [" the cake was good and sweet .", " the cake was stale ."])
    print("eval_accuracy", summary["stages"][0]["metrics"].get("eval_accuracy"), "scores", scores.tolist())
