"""Evaluation commands for reward models."""

from __future__ import annotations

from pathlib import Path

from reward_models.trained import TrainedRewardModel


def eval_pairs_command(args) -> int:
    """`alignment eval pairs`: pairwise accuracy of a reward folder, loaded on the base it records."""
    import json
    import statistics

    from rich.console import Console
    from rich.table import Table

    from alignment.data import preference_rows

    model = TrainedRewardModel.load(args.reward, batch_size=args.batch_size)
    rows, dropped = preference_rows(args.data, None, "--data", model.policy.tokenizer)
    prompts = [r["prompt"] for r in rows]
    chosen = model.score(prompts, [r["chosen"] for r in rows])
    rejected = model.score(prompts, [r["rejected"] for r in rows])
    wins = (chosen > rejected).tolist()
    result = {"pairs": len(rows), "dropped_pairs": dropped, "accuracy": round(statistics.fmean(map(float, wins)), 4)}
    if all("gold_chosen_is_better" in r for r in rows):
        truth = [r["gold_chosen_is_better"] for r in rows]
        result["gold_accuracy"] = round(statistics.fmean(float(w == t) for w, t in zip(wins, truth)), 4)
    result["mean_margin"] = round((chosen - rejected).mean().item(), 4)
    table = Table(title=f"{args.reward} on {args.data}")
    for key in result:
        table.add_column(key)
    table.add_row(*(str(v) for v in result.values()))
    Console().print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
