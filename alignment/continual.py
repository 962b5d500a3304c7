"""Continual-learning chains: task data, the task evaluator, and the chain report (accuracy matrix, BWT, ...).

A *task stage* trains one or more named tasks (``sft``/``ewc`` on a task's data, ``multitask``); a *compose stage*
(``adapter_fusion``) trains none but builds a model from earlier ones. Both are *chain stages*: after each, every
task seen so far (``continual.evaluate: seen``) or every task of the chain (``all``) is evaluated, giving one row of
the accuracy matrix R[i][j] (after chain stage i, on task j). The runner builds :class:`Chain` from the configs and
writes the ``continual`` block of ``summary.json``, ``continual.md`` and ``continual.png``.

Task data: toy tasks (``toy:task/<name>``, held out: ``toy:task/<name>_eval``), or files with ``prompt``/``completion``
(optional ``label``), ``text``/``label`` (trained as prompt = text, completion = " " + label), or
``prompt``/``chosen``/``rejected`` pairs. Every example becomes (prompt, choices, answer): a classification task's
choices are its distinct answers, a pair's are (chosen, rejected). Accuracy is the share of held-out examples where
the right choice has the highest log-likelihood (``method: choice``; a tie of k choices counts 1/k), or where greedy
generation starts with the right answer (``method: generate``). Without ``eval_data`` a seeded 20 % (at most 200) of
the data is held out.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.errors import UserError

if TYPE_CHECKING:
    from alignment.config import ContinualConfig

HOLDOUT_FRACTION, HOLDOUT_MAX = 0.2, 200
MAX_CHOICES = 20  # more distinct answers than this: use `method: generate`


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task of a chain: its name, training data, held-out data (None: held out from ``data``), column mapping."""

    name: str
    data: str
    eval_data: str | None = None
    columns: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_stage(cls, name: str | None, data: str, eval_data: str | None, columns: dict[str, str]) -> TaskSpec:
        toy = toy_task_name(data)
        if eval_data is None and toy is not None:
            eval_data = f"toy:task/{toy}_eval"
        return cls(name or toy or Path(data).stem, data, eval_data, tuple(sorted(columns.items())))


def toy_task_name(source: str) -> str | None:
    """``toy:task/sentiment`` -> ``sentiment``; None for any other source."""
    if source.startswith("toy:task/") and not source.endswith("_eval"):
        return source[len("toy:task/") :]
    return None


# --------------------------------------------------------------------------------------------------- task data


@dataclasses.dataclass
class TaskData:
    name: str
    train: list[dict]  # {"prompt", "choices": [completion texts], "answer": index}
    eval: list[dict]


def _examples(source: str, columns: dict[str, str], field: str) -> tuple[list[dict], str]:
    from alignment.data import load_rows

    rows = load_rows(source, columns, field)
    keys = set(rows[0])
    if {"prompt", "chosen", "rejected"} <= keys:
        return [{"prompt": str(r["prompt"]), "choices": [str(r["chosen"]), str(r["rejected"])], "answer": 0} for r in rows], "pairs"
    if {"prompt", "completion"} <= keys:
        pairs = [(str(r["prompt"]), str(r["completion"])) for r in rows]
    elif {"text", "label"} <= keys:
        pairs = [(str(r["text"]), " " + str(r["label"]).strip()) for r in rows]
    else:
        raise UserError(
            f"{field}: {source!r} is not task data: it needs prompt/completion (optional label), text/label or "
            f"prompt/chosen/rejected columns; columns found: {', '.join(sorted(keys))} (map yours with `columns:`)"
        )
    empty = next((i for i, (p, c) in enumerate(pairs) if not p.strip() or not c.strip()), None)
    if empty is not None:
        raise UserError(f"{field}: {source!r} row {empty + 1} has an empty prompt/completion; fill or drop it")
    return [{"prompt": p, "completion": c} for p, c in pairs], "classification"


def _with_choices(rows: list[dict], choices: list[str]) -> list[dict]:
    return [{"prompt": r["prompt"], "choices": choices, "answer": choices.index(r["completion"])} for r in rows]


def load_task(spec: TaskSpec, seed: int, field: str = "data") -> TaskData:
    """Training and held-out examples of a task (the same split for the stage that trains it and the evaluator)."""
    columns = dict(spec.columns)
    train, kind = _examples(spec.data, columns, field)
    if spec.eval_data is not None:
        held_out, eval_kind = _examples(spec.eval_data, columns, field.replace("data", "eval_data"))
        if eval_kind != kind:
            raise UserError(f"{field}: {spec.data!r} and its eval data {spec.eval_data!r} have different formats")
    else:
        random.Random(seed).shuffle(train)
        n = min(HOLDOUT_MAX, max(1, int(len(train) * HOLDOUT_FRACTION)))
        if len(train) <= n:
            raise UserError(f"{field}: {spec.data!r} has {len(train)} rows; a task needs more to hold some out, or give eval_data")
        held_out, train = train[-n:], train[:-n]
    if kind == "classification":
        choices = list(dict.fromkeys(r["completion"] for r in train + held_out))
        train, held_out = _with_choices(train, choices), _with_choices(held_out, choices)
    return TaskData(spec.name, train, held_out)


def sft_rows(examples: list[dict]) -> list[dict]:
    """prompt/completion rows (the right answer) for supervised training."""
    return [{"prompt": e["prompt"], "completion": e["choices"][e["answer"]]} for e in examples]


def preference_rows(examples: list[dict]) -> list[dict]:
    """prompt/chosen/rejected rows: the right answer against each wrong one."""
    return [
        {"prompt": e["prompt"], "chosen": e["choices"][e["answer"]], "rejected": c}
        for e in examples
        for i, c in enumerate(e["choices"])
        if i != e["answer"]
    ]


# --------------------------------------------------------------------------------------------------- evaluator


def completion_scores(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 64) -> list[float]:
    """Sum of log-probs of each completion given its prompt, batched (prompt + completion tokenised together)."""
    import torch

    from alignment.policy import real_token_logits

    sequences, starts = [], []
    for prompt, completion in zip(prompts, completions):
        starts.append(len(tokenizer(prompt).input_ids))
        sequences.append(tokenizer(prompt + completion).input_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        with torch.no_grad():
            for lo in range(0, len(sequences), batch_size):
                chunk, chunk_starts = sequences[lo : lo + batch_size], starts[lo : lo + batch_size]
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, s in enumerate(chunk):
                    ids[i, : len(s)] = torch.tensor(s)
                    mask[i, : len(s)] = 1
                device = next(model.parameters()).device
                extra = {"prompt_lengths": torch.tensor(chunk_starts)} if getattr(model, "routes_by_prompt", False) else {}
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits.float()
                logits = real_token_logits(logits, ids)  # prompt tuning: without its virtual tokens
                token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
                positions = torch.arange(1, width)[None, :]
                scored = (positions >= torch.tensor(chunk_starts)[:, None]) & (mask[:, 1:] == 1)
                scores += (token_logps.cpu() * scored).sum(1).tolist()
    finally:
        model.train(was_training)
    return scores


def task_accuracy(model, tokenizer, examples: list[dict], method: str = "choice", max_new_tokens: int = 8) -> float:
    """Share of examples answered right: best-scoring choice (``choice``) or greedy generation (``generate``)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    if method == "generate":
        from alignment.evaluation import generate_greedy

        generated = generate_greedy(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens)
        correct = 0
        for e, (text, _) in zip(examples, generated):
            target = e["choices"][e["answer"]].split()
            correct += text.split()[: len(target)] == target
        return correct / len(examples)
    flat_prompts = [e["prompt"] for e in examples for _ in e["choices"]]
    flat_choices = [c for e in examples for c in e["choices"]]
    scores = completion_scores(model, tokenizer, flat_prompts, flat_choices)
    correct, at = 0.0, 0
    for e in examples:
        own = scores[at : at + len(e["choices"])]
        at += len(e["choices"])
        best = [i for i, s in enumerate(own) if s == max(own)]
        correct += (e["answer"] in best) / len(best)  # a tie between k choices: 1/k (a pair's tie counts half)
    return correct / len(examples)


# ------------------------------------------------------------------------------------------------------- chain


@dataclasses.dataclass
class Chain:
    """What a chain stage is told: every task of the chain, which ones are trained by now, and how to evaluate."""

    tasks: list[TaskSpec]  # every task of the chain, in the order they are first trained
    trained: list[str]  # names of the tasks trained up to and including this stage
    earlier: list[str]  # names of the tasks trained before this stage
    settings: ContinualConfig
    seed: int
    _cache: dict[str, TaskData] = dataclasses.field(default_factory=dict)

    def spec(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)

    def data(self, name: str) -> TaskData:
        if name not in self._cache:
            self._cache[name] = load_task(self.spec(name), self.seed, f"task {name!r}")
        return self._cache[name]

    def evaluated(self) -> list[str]:
        return [t.name for t in self.tasks] if self.settings.evaluate == "all" else list(self.trained)

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """Accuracy on each evaluated task's held-out examples (``eval_samples`` of them at most)."""
        out = {}
        for name in self.evaluated():
            examples = self.data(name).eval[: self.settings.eval_samples]
            self._check_choices(name, examples)
            acc = task_accuracy(model, tokenizer, examples, self.settings.method, self.settings.max_new_tokens)
            out[name] = round(acc, 4)
        return out

    def _check_choices(self, name: str, examples: list[dict]) -> None:
        if self.settings.method == "choice" and examples and len(examples[0]["choices"]) > MAX_CHOICES:
            raise UserError(
                f"continual.method: task {name!r} has {len(examples[0]['choices'])} distinct answers; constrained "
                f"choice needs at most {MAX_CHOICES}: set `continual.method: generate`"
            )


def chain_tasks(stages: list[Any]) -> list[TaskSpec]:
    """Every task trained in the chain, in order of first appearance (one spec per name)."""
    out: dict[str, TaskSpec] = {}
    for stage in stages:
        for spec in stage.continual_tasks() or []:
            out.setdefault(spec.name, spec)
    return list(out.values())


def is_chain_stage(stage: Any) -> bool:
    return stage.continual_tasks() is not None


def chain_problems(stages: list[Any]) -> list[str]:
    """Config problems of a chain: one task name used for two different data sources."""
    problems, seen = [], {}
    for i, stage in enumerate(stages):
        for spec in stage.continual_tasks() or []:
            if spec.name in seen and seen[spec.name].data != spec.data:
                problems.append(
                    f"stages.{i}.task: task {spec.name!r} already names {seen[spec.name].data!r}; give this data "
                    "another `task:` name"
                )
            seen.setdefault(spec.name, spec)
    return problems


# ------------------------------------------------------------------------------------------------------ report


def continual_block(rows: list[dict], tasks: list[str], baseline: dict[str, float] | None) -> dict[str, Any]:
    """The summary's ``continual`` block from the chain rows ({"stage", "dir", "trains", "accuracy": {task: acc}})."""
    from alignment.algorithms.continual import continual_metrics

    acc = [[row["accuracy"].get(t) for t in tasks] for row in rows]
    trained_at = []
    for t in tasks:
        rows_training = [i for i, row in enumerate(rows) if t in row["trains"]]
        trained_at.append(rows_training[-1] if rows_training else len(rows) - 1)
    base = [baseline.get(t) for t in tasks] if baseline else None
    return {
        "tasks": tasks,
        "acc_matrix": acc,
        **continual_metrics(acc, trained_at, base),
        "rows": [{"stage": row["stage"], "dir": row["dir"], "trains": row["trains"]} for row in rows],
        "trained_at": trained_at,
        "baseline": base,
    }


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(block: dict[str, Any]) -> str:
    tasks = block["tasks"]
    lines = ["| after stage | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    if block.get("baseline"):
        lines.append("| base model | " + " | ".join(_cell(v) for v in block["baseline"]) + " |")
    for row, values in zip(block["rows"], block["acc_matrix"]):
        trains = ", ".join(row["trains"]) or "composes"
        lines.append(f"| {row['dir']} ({trains}) | " + " | ".join(_cell(v) for v in values) + " |")
    summary = "  ".join(f"{k} {_cell(block[k]) if block[k] is not None else 'n/a'}" for k in ("avg_acc", "bwt", "fwt", "forgetting"))
    return "\n".join(lines) + f"\n\n{summary}\n"


def write_continual_report(run_dir: Path, block: dict[str, Any], title: str) -> None:
    """``continual.md`` (the accuracy matrix and metrics) and ``continual.png`` (a heatmap) in the run folder."""
    from alignment.io import atomic_write_text, skip_write

    if skip_write(run_dir / "continual.png"):
        return  # another rank of a multi-process run writes it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_text(run_dir / "continual.md", f"# {title}: accuracy after each chain stage\n\n" + markdown_table(block))
    labels = [f"{r['dir']}" for r in block["rows"]]
    values = [[float("nan") if v is None else v for v in row] for row in block["acc_matrix"]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(block["tasks"]), 1.2 + 0.55 * len(labels)))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(block["tasks"])), block["tasks"])
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("task")
    ax.set_ylabel("after stage")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="black" if v > 0.6 else "white", fontsize=9)
    metrics = ", ".join(f"{k} {block[k]:.3f}" for k in ("avg_acc", "bwt") if block[k] is not None)
    ax.set_title(f"{title}  ({metrics})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    tmp = run_dir / "continual.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(run_dir / "continual.png")
