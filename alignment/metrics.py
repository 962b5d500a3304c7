"""Per-stage metrics: ``metrics.jsonl`` (every log step), one concise console line per step, optional wandb."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)

# keys shown on the console line when present (metrics.jsonl always gets every key)
CONSOLE_KEYS = ("loss", "eval_loss", "accuracy", "margin", "grad_norm", "learning_rate", "mean_token_accuracy", "epoch")
CONSOLE_MAX_KEYS = 8


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


class MetricsLogger:
    def __init__(self, stage_dir: Path, label: str, wandb_run=None):
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.label = label
        self.wandb_run = wandb_run
        self.start = time.time()
        from alignment.io import skip_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # in a multi-process run only rank 0 keeps metrics.jsonl
        self._file = open(os.devnull, "w") if skip_write(self.path) else self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any], echo: bool = True) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}
        record = {"step": step, "time_s": round(time.time() - self.start, 3), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if echo:
            keys = [k for k in CONSOLE_KEYS if k in metrics] or list(metrics)
            shown = "  ".join(f"{k} {_fmt(metrics[k])}" for k in keys[:CONSOLE_MAX_KEYS])
            console.print(f"[dim]\\[{self.label}][/dim] step {step:>4}  {shown}")

    def close(self, final: dict[str, Any] | None = None) -> None:
        if self.wandb_run is not None:
            if final:
                for k, v in final.items():
                    self.wandb_run.summary[k] = v
            self.wandb_run.finish()
            self.wandb_run = None
        if not self._file.closed:
            self._file.close()


def start_wandb(project: str, group: str, name: str, config: dict, directory: Path):
    import wandb

    return wandb.init(
        project=project, group=group, name=name, config=config, dir=str(directory), reinit="finish_previous"
    )
