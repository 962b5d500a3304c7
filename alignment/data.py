"""Data loading: toy datasets, jsonl/json/csv/parquet files and `datasets` names, into plain rows.

Every problem is a :class:`UserError` naming the source (and line, where there is one) and what to do.
Formats: ``prompt``/``completion`` pairs, chat ``messages``, plain ``text``; ``columns`` maps a user's column names
onto ours (``{prompt: question, completion: answer}``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from alignment.errors import UserError

TOY_SOURCES = [
    "sft",
    "sft_eval",
    "preference",
    "preference_eval",
    "prompts",
    "task/sentiment",
    "task/topic",
    "task/number",
    "task/sentiment_eval",
    "task/topic_eval",
    "task/number_eval",
]


def load_rows(source: str, columns: dict[str, str] | None = None, field: str = "data") -> list[dict[str, Any]]:
    """Rows of ``source`` with ``columns`` renamed (user name -> our name). Raises UserError on any problem."""
    if source.startswith("toy:"):
        from alignment.toy import active_world
        from alignment.toy.build import ensure_toy

        name = source[4:]
        if name not in TOY_SOURCES:
            raise UserError(f"{field}: unknown toy dataset {source!r}; choose one of toy:{', toy:'.join(TOY_SOURCES)}")
        rows = _read_jsonl(ensure_toy(active_world()) / "data" / (name.replace("task/", "task_") + ".jsonl"))
    else:
        path = Path(source).expanduser()
        if path.is_file():
            rows = _read_file(path)
        elif source.endswith((".jsonl", ".json", ".csv", ".parquet")) or source.startswith(("/", "./", "../")):
            raise UserError(f"{field}: data file {source!r} not found (paths are relative to where you run)")
        else:
            rows = _read_datasets(source, field)
    if not rows:
        raise UserError(f"{field}: {source!r} holds no rows; give it at least one example")
    if columns:
        missing = [theirs for theirs in columns.values() if theirs not in rows[0]]
        if missing:
            raise UserError(
                f"{field}: {source!r} has no column(s) {', '.join(missing)} named in `columns`; "
                f"columns found: {', '.join(rows[0])}"
            )
        rows = [{**{k: v for k, v in r.items()}, **{ours: r[theirs] for ours, theirs in columns.items()}} for r in rows]
    return rows


def row_location(source: str, index: int) -> str:
    """Where row ``index`` (0-based, as ``load_rows`` returned it) is in ``source``, for error messages: ``line N``
    (1-based) of a .jsonl file (blank lines count) or a .csv file (the header is line 1), else ``row N`` (1-based)."""
    path = Path(source).expanduser()
    try:
        if path.suffix == ".jsonl" and path.is_file():
            with path.open(encoding="utf-8") as f:
                seen = -1
                for lineno, line in enumerate(f, 1):
                    seen += bool(line.strip())
                    if seen == index:
                        return f"line {lineno}"
        if path.suffix == ".csv" and path.is_file():
            with path.open(encoding="utf-8", newline="") as f:
                reader, n, start = csv.reader(f), -2, 1  # -2: the header is not a row
                for record in reader:
                    n += bool(record)  # DictReader skips blank lines
                    if record and n == index:
                        return f"line {start}"
                    start = reader.line_num + 1
    except (OSError, UnicodeDecodeError):
        pass
    return f"row {index + 1}"


def _read_file(path: Path) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"data": [...]} or column-oriented
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 and all(isinstance(x, dict) for x in lists[0]) else _columns_to_rows(data)
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise UserError(f"{path}: a .json data file must hold a list of objects (one per example)")
            return data
        if path.suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # pyarrow errors on a corrupt parquet file
        if path.suffix == ".parquet":
            raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
        raise
    raise UserError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")


def _columns_to_rows(data: dict) -> list[dict]:
    if not data or not all(isinstance(v, list) for v in data.values()):
        return data  # reported by the caller
    n = len(next(iter(data.values())))
    return [{k: v[i] for k, v in data.items()} for i in range(n)]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with Path(path).open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg}); one JSON object per line") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}: line {lineno} is not a JSON object")
                rows.append(row)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save the file as UTF-8") from None
    return rows


def _read_datasets(name: str, field: str) -> list[dict]:
    import datasets

    split = "train"
    if "@" in name:  # "org/name@validation"
        name, split = name.split("@", 1)
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types; all mean "cannot use this source"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{field}: cannot load {name!r} as a data file or `datasets` name ({first}); check the path or name"
        ) from None
    return ds.to_list()


# ---------------------------------------------------------------------------------------------- formats


def detect_format(rows: list[dict], source: str, field: str, wanted: tuple[str, ...]) -> str:
    """Which of ``wanted`` formats the rows are in: prompt_completion, messages or text."""
    keys = set(rows[0])
    candidates = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}
    for fmt in wanted:
        if set(candidates[fmt]) <= keys:
            return fmt
    need = " or ".join("/".join(candidates[f]) for f in wanted)
    raise UserError(
        f"{field}: {source!r} needs columns {need}; columns found: {', '.join(sorted(keys))} "
        "(map yours with `columns: {prompt: your_column, ...}`)"
    )


def sft_rows(source: str, columns: dict[str, str] | None, field: str = "data") -> tuple[list[dict], str]:
    """Rows for supervised fine-tuning in TRL's formats, and the format name."""
    rows = load_rows(source, columns, field)
    fmt = detect_format(rows, source, field, ("prompt_completion", "messages", "text"))
    keep = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}[fmt]
    out = []
    for i, r in enumerate(rows):
        values = [r.get(k) for k in keep]
        if any(v is None or v == "" for v in values):
            raise UserError(f"{field}: {source!r} row {i + 1} has an empty {'/'.join(keep)}; fill or drop it")
        out.append({k: r[k] for k in keep})
    return out, fmt


def _split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF style: two full transcripts sharing a prompt prefix -> (prompt, chosen, rejected).

    The split is at the last whitespace inside the common prefix, so answers keep their leading space.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1))
    cut = cut if cut > 0 else n
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _messages_text(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def preference_rows(
    source: str, columns: dict[str, str] | None, field: str = "data", tokenizer=None
) -> tuple[list[dict], int]:
    """Rows with prompt/chosen/rejected (+ gold_chosen_is_better when the data has it), and how many were dropped.

    Accepted: prompt/chosen/rejected text; chosen/rejected full transcripts sharing a prefix (HH-RLHF style);
    chat messages (chosen/rejected as message lists ending in the assistant answer, an optional `prompt` list).
    Pairs whose two answers are identical are dropped and counted; if every pair is dropped that is an error.
    """
    rows = load_rows(source, columns, field)
    keys = set(rows[0])
    if not {"chosen", "rejected"} <= keys:
        raise UserError(
            f"{field}: {source!r} needs columns prompt/chosen/rejected (or chosen/rejected transcripts); "
            f"columns found: {', '.join(sorted(keys))} (map yours with `columns: {{chosen: your_column, ...}}`)"
        )
    out, dropped = [], 0
    for i, r in enumerate(rows):
        chosen, rejected, prompt = r["chosen"], r["rejected"], r.get("prompt")
        if isinstance(chosen, list) or isinstance(rejected, list):  # chat messages
            if tokenizer is None:
                raise UserError(f"{field}: chat-format preference data needs a tokenizer with a chat template")
            history = list(prompt or []) + list(chosen[:-1])
            prompt = _messages_text(tokenizer, history, True)
            chosen = " " + str(chosen[-1]["content"])
            rejected = " " + str(rejected[-1]["content"])
        elif prompt is None:
            prompt, chosen, rejected = _split_transcripts(str(chosen), str(rejected))
        if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip() or not rejected.strip():
            raise UserError(f"{field}: {source!r} row {i + 1} has an empty or non-text chosen/rejected answer")
        if chosen.strip() == rejected.strip():
            dropped += 1
            continue
        row = {"prompt": str(prompt), "chosen": chosen, "rejected": rejected}
        if "gold_chosen_is_better" in r:
            row["gold_chosen_is_better"] = bool(r["gold_chosen_is_better"])
        out.append(row)
    if not out:
        raise UserError(
            f"{field}: every pair in {source!r} was dropped ({dropped} with identical chosen and rejected answers); "
            "the data has no preference signal"
        )
    return out, dropped


def check_text_lengths(rows: list[dict], tokenizer, max_length: int, policy: str, field: str) -> dict[str, int]:
    """Plain ``text`` rows (language modelling, no prompt to cut) longer than ``max_length`` tokens: refused
    (``policy == "refuse"``) or counted and cut at the end by the trainer (``"truncate"``); returns
    ``{"long_prompts_truncated": n}`` when there are any. Rows with a prompt are fitted by alignment/truncation.py."""
    if not rows or "text" not in rows[0]:
        return {}
    lengths = [len(tokenizer(str(r["text"]), add_special_tokens=False)["input_ids"]) for r in rows]
    long = [i for i, n in enumerate(lengths) if n >= max_length]
    if not long:
        return {}
    what = (f"{len(long)} of {len(rows)} texts are {max_length} tokens or longer (max_length; the longest has "
            f"{max(lengths)})")
    if policy == "refuse":
        raise UserError(f"{field}: {what}; raise `max_length`, shorten them, or set `long_prompts: truncate`")
    from alignment.metrics import console

    console.print(f"[yellow]warning:[/yellow] {field}: {what}: their ends are cut (long_prompts: truncate)")
    return {"long_prompts_truncated": len(long)}
