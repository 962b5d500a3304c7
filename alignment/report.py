"""The run report: ``report.md``, a self-contained ``report.html`` (plots inlined) and ``plots/*.png``.

Written at the end of every ``alignment run`` and by ``alignment report <run folder>``. Everything comes from the run
folder alone (summary.json, manifest.json, pipeline.yaml, each stage's metrics.jsonl), so a report can be rebuilt
anywhere, from a copied folder, without loading a model.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path

from alignment.errors import UserError
from alignment.io import atomic_write_text, read_json

# per stage kind: (plot title, metric keys drawn on it); a plot is drawn only when its keys were logged
CURVES = [
    ("loss", ("loss", "eval_loss")),
    ("reward model accuracy", ("accuracy", "eval_accuracy")),
    ("DPO / KTO / ORPO reward margins", ("rewards/margins",)),
    ("learned reward", ("reward", "reward_normalized")),
    ("KL to the reference", ("kl",)),
    ("toy gold reward", ("gold_reward", "gold_content")),
    ("policy diagnostics", ("approx_kl", "clipfrac", "entropy")),
]
TIME_KEYS = ("time_generate_s", "time_score_s", "time_train_s", "time_sync_s")


def write_report(run_dir: str | Path) -> Path:
    """Write report.md, report.html and plots/ into ``run_dir``; returns the path of report.md."""
    run_dir = Path(run_dir)
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise UserError(f"{run_dir}: not a run folder (no summary.json); pass runs/<name>")
    summary = read_json(summary_file)
    manifest = read_json(run_dir / "manifest.json") if (run_dir / "manifest.json").is_file() else {}
    plots_dir = run_dir / "plots"
    shutil.rmtree(plots_dir, ignore_errors=True)  # no stale plots of stages that are gone
    plots_dir.mkdir()
    plots = []  # (stage label, title, path)
    for stage in summary["stages"]:
        label = f"{stage['index']}-{stage['kind'].split(':')[-1]}"
        rows = _metrics_rows(run_dir / stage["dir"] / "metrics.jsonl")
        for title, keys in CURVES:
            path = _curve(plots_dir / f"{label}-{title.split()[0].lower().replace('/', '')}.png", f"{label}: {title}",
                          rows, keys)
            if path:
                plots.append((label, title, path))
        times = {k[5:-2]: stage["metrics"][k] for k in TIME_KEYS if isinstance(stage["metrics"].get(k), (int, float))}
        if times:
            plots.append((label, "time split", _bars(plots_dir / f"{label}-time.png", f"{label}: time split (s)", times)))
    if summary.get("continual"):
        heatmap = _heatmap(plots_dir / "continual.png", summary["continual"])
        plots.append(("continual", "accuracy matrix", heatmap))

    md = _markdown(run_dir, summary, manifest, plots)
    atomic_write_text(run_dir / "report.md", md)
    atomic_write_text(run_dir / "report.html", _html(summary["name"], md, plots, run_dir))
    return run_dir / "report.md"


# ----------------------------------------------------------------------------------------------- pieces


def _metrics_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill: the report still draws the rest
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(path: Path, title: str, rows: list[dict], keys: tuple[str, ...]) -> Path | None:
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="o" if len(points) < 15 else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step / iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    """Write the figure atomically (a temp name, then rename) and close it."""
    from alignment.io import atomic_file

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def _bars(path: Path, title: str, values: dict[str, float]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.barh(list(values), list(values.values()), color="tab:blue")
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


def _heatmap(path: Path, continual: dict) -> Path:
    plt = _pyplot()
    matrix, tasks = continual["acc_matrix"], continual["tasks"]
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 0.8 * len(matrix) + 1.5))
    ax.imshow([[v if v is not None else float("nan") for v in row] for row in matrix], vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(matrix)), [f"after stage {i}" for i in range(len(matrix))])
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_title("accuracy R[i][j]", fontsize=10)
    return _save(plt, fig, path)


def _markdown(run_dir: Path, summary: dict, manifest: dict, plots: list) -> str:
    base = f"; base model gold_reward {summary['base_gold_reward']}" if "base_gold_reward" in summary else ""
    lines = [f"# Run `{summary['name']}`", "", f"Model: `{summary.get('model')}`{base}"]
    lines += ["", "## Stages", "", "| # | kind | status | time (s) | key metrics | artifacts |", "|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        m = s["metrics"]
        keys = [k for k in ("train_loss", "eval_accuracy", "reward", "kl", "gold_reward", "gold_content",
                            "gold_win_rate", "samples_per_s") if isinstance(m.get(k), (int, float))]
        shown = ", ".join(f"{k} {m[k]}" for k in keys)
        extra = f" ({s['engine']}, sync {s['sync_mode']})" if "engine" in s else ""
        lines.append(f"| {s['index']} | {s['kind']}{extra} | {s['status']} | {s.get('wall_time_s', '')} | {shown} | "
                     f"{', '.join(f'`{k}`' for k in s['artifacts'])} |")
    if summary.get("continual"):
        c = summary["continual"]
        lines += ["", "## Continual learning", "",
                  f"avg_acc {c.get('avg_acc')}, bwt {c.get('bwt')}, fwt {c.get('fwt')}, forgetting {c.get('forgetting')}"]
    lines += ["", "## Plots", ""]
    for label, title, path in plots:
        lines.append(f"![{label}: {title}](plots/{Path(path).name})")
    lines += ["", "## Lineage", ""]
    for s in manifest.get("stages", []):
        inputs = ", ".join(f"{k} <- {v}" for k, v in s.get("inputs", {}).items()) or "none"
        lines.append(f"- stage {s['index']} `{s['kind']}` (config {s.get('config_hash')}): inputs {inputs}; "
                     f"outputs {', '.join(s.get('outputs', {})) or 'none'}")
    if manifest.get("packages"):
        lines += ["", "Packages: " + ", ".join(f"{k} {v}" for k, v in manifest["packages"].items())]
    config = run_dir / "pipeline.yaml"
    if config.is_file():
        lines += ["", "## Resolved config", "", "```yaml", config.read_text().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _html(name: str, md: str, plots: list, run_dir: Path) -> str:
    """The markdown as preformatted text plus every plot inlined as base64: one file, no external references."""
    images = "\n".join(
        f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(Path(path).read_bytes()).decode()}'><figcaption>{html.escape(label)}: "
        f"{html.escape(title)}</figcaption></figure>"
        for label, title, path in plots
    )
    before, _, rest = md.partition("## Plots")
    text = before + "## Lineage" + rest.partition("## Lineage")[2]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Run {html.escape(name)}</title>"
            "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}pre{white-space:pre-wrap}"
            "figure{display:inline-block;margin:.5em}</style></head><body>"
            f"<pre>{html.escape(text)}</pre><h2>Plots</h2>{images}</body></html>\n")
