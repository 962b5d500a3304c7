"""Evaluation commands for reward models."""

from __future__ import annotations

from pathlib import Path

from alignment.io import atomic_write_json
from reward_models.trained import TrainedRewardModel


def eval_pairs_command(args) -> int:
    """`alignment eval pairs`: pairwise accuracy of a reward folder, loaded on the base it records."""
    from rich.console import Console
    from rich.table import Table

    import torch

    from alignment.algorithms.preference import pairwise_accuracy, tie_rate
    from alignment.data import preference_rows
    from alignment.truncation import PromptFitter, fit_rows

    model = TrainedRewardModel.load(args.reward, batch_size=args.batch_size)
    rows, identical = preference_rows(args.data, None, "--data", model.policy.tokenizer)
    # as the reward stage: prompts cut from the left to fit with both answers; identical or too-long pairs dropped
    fitter = PromptFitter(model.policy.tokenizer, model.max_length, eos=False, field="--data")
    fitted = fit_rows(rows, fitter, ("chosen", "rejected"), "truncate", 1.0, identical)
    rows = fitted.rows
    prompts = [r["prompt"] for r in rows]
    chosen = model.score(prompts, [r["chosen"] for r in rows])
    rejected = model.score(prompts, [r["rejected"] for r in rows])
    result = {"pairs": len(rows), "dropped_pairs": fitted.dropped,  # accuracies: a tie counts half
              "accuracy": round(pairwise_accuracy(chosen, rejected), 4),
              "tie_rate": round(tie_rate(chosen, rejected), 4)}
    if all("gold_chosen_is_better" in r for r in rows):
        truth = torch.tensor([r["gold_chosen_is_better"] for r in rows])
        result["gold_accuracy"] = round(pairwise_accuracy(chosen, rejected, truth), 4)
    result["mean_margin"] = round((chosen - rejected).mean().item(), 4)
    table = Table(title=f"{args.reward} on {args.data}")
    for key in result:
        table.add_column(key)
    table.add_row(*(str(v) for v in result.values()))
    Console().print(table)
    if args.json_out:
        atomic_write_json(Path(args.json_out), result)
    return 0


def eval_policy_command(args) -> int:
    """`alignment eval policy`: a run's final policy, an exported model or a model id, on the measures asked for."""
    import statistics

    from rich.console import Console
    from rich.table import Table

    from alignment.errors import UserError
    from alignment.export import Generator

    generator = Generator(args.source)
    policy, result = generator.policy, {}
    from alignment.toy import world_of

    toy = world_of(generator.model_ref) is not None or args.gold
    toy_world = world_of(generator.model_ref) or 0
    prompts = _prompts(args.prompts) if args.prompts else None
    if prompts is None and (args.reward or args.against):
        if not toy:
            raise UserError("eval policy: --reward/--against need --prompts (a file with a `prompt` column)")
        from alignment.toy import world

        prompts = world.eval_prompts(toy_world)
    completions = generator(prompts, args.max_new_tokens, 0.0) if prompts else []
    reward_model = TrainedRewardModel.load(args.reward) if args.reward else None
    if reward_model is not None:
        scores = reward_model.score(prompts, completions)
        result["mean_reward"] = round(scores.mean().item(), 4)
    if toy:
        from alignment.evaluation import gold_eval

        with policy.using("policy"):
            result.update(gold_eval(policy.model, policy.tokenizer, toy_world))
    if args.against:
        other = Generator(args.against)
        theirs = other(prompts, args.max_new_tokens, 0.0)
        if reward_model is not None:
            mine, other_scores = scores.tolist(), reward_model.score(prompts, theirs).tolist()
            judge = "reward model"
        elif toy:
            from alignment.toy import world

            mine = [world.gold_score(p, c).reward for p, c in zip(prompts, completions)]
            other_scores = [world.gold_score(p, c).reward for p, c in zip(prompts, theirs)]
            judge = "toy gold"
        else:
            raise UserError("eval policy --against: needs --reward (or a toy model) to judge the answers")
        result["win_rate"] = round(statistics.fmean(1.0 if a > b else 0.5 if a == b else 0.0
                                                    for a, b in zip(mine, other_scores)), 4)
        result["win_rate_judge"] = judge
    if args.perplexity:
        result["perplexity"] = round(_perplexity(policy, Path(args.perplexity)), 4)
    for source in args.tasks or []:
        from alignment.continual import TaskSpec, load_task, task_accuracy

        task = load_task(TaskSpec.from_stage(None, source, None, {}), 0, "--tasks")
        with policy.using("policy"):
            result[f"accuracy/{task.name}"] = round(task_accuracy(policy.model, policy.tokenizer, task.eval), 4)
    generator.close()
    table = Table(title=f"{args.source}")
    table.add_column("measure")
    table.add_column("value")
    for key, value in result.items():
        table.add_row(key, str(value))
    Console().print(table)
    if args.json_out:
        atomic_write_json(Path(args.json_out), result)
    return 0


def _prompts(source: str) -> list[str]:
    from alignment.data import load_rows
    from alignment.errors import UserError

    rows = load_rows(source, None, "--prompts")
    if "prompt" not in rows[0]:
        raise UserError(f"--prompts: {source!r} needs a `prompt` column; columns found: {', '.join(sorted(rows[0]))}")
    return [str(r["prompt"]) for r in rows]


def _perplexity(policy, path: Path) -> float:
    """exp(mean negative log-likelihood per predicted token) over the non-empty lines of a text file."""
    import math

    import torch

    from alignment.errors import UserError

    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--perplexity: cannot read {path} as UTF-8 text ({e})") from None
    if not lines:
        raise UserError(f"--perplexity: {path} has no text lines")
    total, count = 0.0, 0
    with torch.no_grad(), policy.using("policy") as model:
        for line in lines:
            ids = policy.tokenizer(line, return_tensors="pt")["input_ids"].to(model.device)
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss.item()
            total, count = total + loss * (ids.shape[1] - 1), count + ids.shape[1] - 1
    return math.exp(total / max(count, 1))
