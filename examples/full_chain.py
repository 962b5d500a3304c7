"""SFT -> reward model -> PPO from Python: the same chain as `alignment run configs/sft_rm_ppo.yaml`.

    python examples/full_chain.py                  # the full toy chain (~2-3 min on 2 CPU cores)
    python examples/full_chain.py --quick          # a few steps of each stage (what the test runs)
"""

import argparse
from pathlib import Path

from alignment.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
QUICK = ["stages.0.max_steps=20", "stages.1.max_steps=20", "stages.2.iterations=2", "stages.2.batch_size=8",
         "stages.2.minibatch_size=8", "rollout.engine=hf"]

if __name__ == "__main__":  # vLLM starts worker processes: keep the entry point guarded
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default="runs")
    args = parser.parse_args()
    overrides = [f"output_dir={args.output_dir}", "name=example_chain"] + (QUICK if args.quick else [])
    summary = Pipeline.from_yaml(REPO / "configs" / "sft_rm_ppo.yaml", overrides).run()
    for stage in summary["stages"]:
        print(stage["kind"], "gold_reward", stage["metrics"].get("gold_reward"))
