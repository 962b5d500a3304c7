"""Swap PPO for DPO with one override: the SFT and reward stages of the same run are reused, not retrained.

    python examples/swap_ppo_for_dpo.py [--quick]
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
    quick = ["stages.0.max_steps=20", "stages.1.max_steps=20", "stages.2.max_steps=10"] if args.quick else []
    # DPO's data defaults to the preference data the reward stage trained on; sft_weight keeps it on-distribution
    overrides = [f"output_dir={args.output_dir}", "name=example_swap", "stages.2.kind=dpo", "stages.2.sft_weight=1.0"]
    pipeline = Pipeline.from_yaml(REPO / "configs" / "sft_rm_ppo.yaml", overrides + quick)
    for warning in pipeline.warnings:  # the unused reward stage and the dropped PPO fields are reported
        print("warning:", warning)
    summary = pipeline.run()
    print({s["kind"]: s["metrics"].get("gold_reward") for s in summary["stages"]})
