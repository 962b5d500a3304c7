"""A continual chain: three toy tasks in a row on one LoRA adapter under EWC, then the accuracy matrix.

    python examples/continual_chain.py [--quick]

For your own tasks, point each stage's `data` at a jsonl with `text`/`label` or `prompt`/`completion` columns
(see docs/continual.md).
"""

import argparse
from pathlib import Path

from alignment.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default="runs")
    args = parser.parse_args()
    quick = []
    if args.quick:
        quick = ["continual.eval_samples=50"] + [f"stages.{i}.{k}" for i in range(3)
                                                 for k in ("max_steps=10", "fisher_samples=20")]
    overrides = [f"output_dir={args.output_dir}", "name=example_continual"] + quick
    summary = Pipeline.from_yaml(REPO / "configs" / "continual_ewc.yaml", overrides).run()
    block = summary["continual"]
    print("tasks", block["tasks"], "avg_acc", block["avg_acc"], "bwt", block["bwt"], "forgetting", block["forgetting"])
