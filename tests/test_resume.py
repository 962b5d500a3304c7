"""Kill -9 anywhere and rerun: the resumed run ends exactly where an uninterrupted one does.

The CLI runs in child processes; ALIGNMENT_TEST_KILL_AT makes the process send itself a real SIGKILL (or SIGINT, what
Ctrl-C sends) at a named point (alignment/faults.py): after an optimiser step before its checkpoint, in the middle of
writing a checkpoint, or right after a stage's DONE marker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignment import checkpoint
from tests.conftest import REPO
from tests.forked import run_forked

TIMING = ("time_", "samples_per_s", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def pipeline(tmp: Path, toy_dir: Path) -> Path:
    """SFT -> reward model -> DPO -> PPO (scored by that reward model) on the toy model (by path: no gold
    evaluation), a few steps each, checkpoints often."""
    raw = {
        "name": "resume",
        "model": str(toy_dir / "model"),
        "output_dir": str(tmp / "runs"),
        "logging": {"log_every": 1},  # (TRL's reward accuracy is a mean over the last logging window)
        "rollout": {"engine": "hf"},  # sampling from torch's RNG, which the checkpoint restores
        "stages": [
            {"kind": "sft", "max_steps": 4, "batch_size": 8, "max_samples": 64, "checkpoint_every": 2},
            {"kind": "reward", "max_steps": 4, "batch_size": 4, "max_samples": 40, "checkpoint_every": 2},
            {"kind": "dpo", "max_steps": 4, "batch_size": 4, "max_samples": 32, "checkpoint_every": 4},
            {"kind": "ppo", "reward_normalization": "running", "iterations": 4, "batch_size": 4,
             "minibatch_size": 2, "max_new_tokens": 8, "checkpoint_every": 1},
        ],
    }
    path = tmp / "resume.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(tmp: Path, config: Path, kill_at: str | None = None, sig: str = "KILL") -> tuple[int, str]:
    """``alignment run config`` in a forked child process (tests/forked.py): (exit code, stderr); -9 is SIGKILL."""
    env = {"ALIGNMENT_TEST_KILL_AT": kill_at, "ALIGNMENT_TEST_KILL_SIGNAL": sig} if kill_at else {}
    log = tmp / f"stderr-{(kill_at or 'final').replace(':', '_')}.txt"
    return run_forked(["run", str(config)], log, env)


def killed_and_resumed(tmp: Path, raw: dict, kill_at: str, resumes_from: str) -> tuple[Path, Path, str]:
    """``raw`` run once uninterrupted (as `reference`), then killed with kill -9 at ``kill_at`` and rerun; asserts
    the rerun resumed from ``resumes_from`` (e.g. `1-ppo from iter-00001`). Returns (run folder, reference folder,
    the rerun's stderr)."""
    config = tmp / f"{raw['name']}.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, err = run_forked(["run", str(config), "name=reference"], tmp / "stderr-reference.txt")
    assert rc == 0, err[-3000:]
    rc, err = cli(tmp, config, kill_at=kill_at)
    assert rc == -signal.SIGKILL, err[-3000:]
    rc, err = cli(tmp, config)
    assert rc == 0, err[-3000:]
    assert f"resuming {resumes_from}" in err
    return tmp / "runs" / raw["name"], tmp / "runs" / "reference", err


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING)}


def logged(stage_dir: Path) -> list[dict]:
    """A stage's metrics.jsonl lines without their timings."""
    return [without_timing(json.loads(x)) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_kill_at_six_points_across_four_stages_then_resume_matches_uninterrupted(tmp_path, toy_dir):
    config = pipeline(tmp_path, toy_dir)
    from alignment.pipeline import Pipeline

    Pipeline.from_yaml(config, ["name=reference"]).run()  # uninterrupted, in this process

    # (kill point, signal, expected exit code, what the next run must resume from)
    kills = [
        ("0-sft:step:3", "KILL", -signal.SIGKILL, None),  # in SFT (TRL), after step 3, before any checkpoint of it
        ("0-sft:done", "KILL", -signal.SIGKILL, "resuming 0-sft from checkpoint-2"),  # between SFT and the RM
        ("1-reward:step:3", "KILL", -signal.SIGKILL, None),  # in the reward stage's own loop
        ("2-dpo:step:3", "INT", 130, "resuming 1-reward from iter-00002"),  # Ctrl-C in DPO: checkpoint-3, exit 130
        ("3-ppo:step:2", "KILL", -signal.SIGKILL, "resuming 2-dpo from checkpoint-3"),  # inside PPO
        ("3-ppo:save:3", "KILL", -signal.SIGKILL, "resuming 3-ppo from iter-00001"),  # while writing a checkpoint
    ]
    for point, sig, code, resumed in kills:
        rc, err = cli(tmp_path, config, kill_at=point, sig=sig)
        assert rc == code, (point, err[-3000:])
        if resumed:
            assert resumed in err, (point, err[-3000:])
    run = tmp_path / "runs" / "resume"
    half_written = [p for p in (run / "3-ppo" / "checkpoints").iterdir() if p.name.startswith(".iter-00003")]
    assert half_written and not (half_written[0] / checkpoint.COMPLETE).exists()

    rc, err = cli(tmp_path, config)
    assert rc == 0, err[-3000:]
    assert "resuming 3-ppo from iter-00002" in err  # the half-written iteration 3 was skipped
    got = json.loads((run / "summary.json").read_text())
    want = json.loads((tmp_path / "runs" / "reference" / "summary.json").read_text())
    assert [s["status"] for s in got["stages"]] == ["skipped", "skipped", "skipped", "done"]
    for g, w in zip(got["stages"], want["stages"]):
        assert without_timing(g["metrics"]) == without_timing(w["metrics"]), g["dir"]
    # every PPO iteration logged the same numbers (the resumed iterations replaced the lost ones)
    lines = [without_timing(json.loads(x)) for x in (run / "3-ppo" / "metrics.jsonl").read_text().splitlines()]
    ref = [without_timing(json.loads(x)) for x in
           (tmp_path / "runs" / "reference" / "3-ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and lines == ref
    for name in ("0-sft", "1-reward", "2-dpo", "3-ppo"):
        for f in (f for f in (run / name).rglob("*.safetensors") if "checkpoints" not in f.parts):  # artifacts
            assert f.read_bytes() == (tmp_path / "runs" / "reference" / name / f.relative_to(run / name)).read_bytes()


def test_half_written_checkpoint_is_ignored_and_the_previous_used(tmp_path):
    stage = tmp_path / "0-sft"
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = stage / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "optimizer.pt").write_bytes(b"x" * 10)
        if complete:
            checkpoint.mark_complete(folder, step)
    (stage / "checkpoints" / ".iter-00008.abc").mkdir()  # an atomic_dir temp folder left by a kill
    cut = stage / "checkpoints" / "checkpoint-5"  # complete once, then a file cut short (a deletion or copy killed)
    cut.mkdir()
    (cut / "optimizer.pt").write_bytes(b"x" * 10)
    checkpoint.mark_complete(cut, 5)
    (cut / "optimizer.pt").write_bytes(b"x" * 3)
    (stage / "metrics.jsonl").write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n{"step": 7, "lo')
    (stage / "STARTED").write_text(json.dumps({"fingerprint": "abc"}))
    (stage / "config.yaml").write_text("x")
    assert checkpoint.prepare_stage_dir(stage, "abc") == stage / "checkpoints" / "checkpoint-4"
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert [json.loads(x)["step"] for x in (stage / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert not (stage / "config.yaml").exists()
    # another fingerprint (the config changed): start clean
    assert checkpoint.prepare_stage_dir(stage, "other") is None
    assert sorted(p.name for p in stage.iterdir()) == ["STARTED"]


def test_online_state_round_trips_without_pickle(tmp_path):
    import random

    import torch

    param = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(4)
    opt.step()
    head = torch.randn(3)
    torch.manual_seed(5)
    rng = random.Random(3)
    state = {"order_rng": checkpoint.python_rng_state(rng), "order": [3, 1]}
    folder = tmp_path / "iter-00001"
    checkpoint.save_online_checkpoint(folder, 1, {"head": head}, {"p": opt}, state)
    expected_draw, expected_rand = torch.rand(2), rng.random()
    assert checkpoint.is_complete(folder) and not list(folder.glob("*.pt"))

    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))], lr=0.5)
    tensors, restored = checkpoint.load_online_checkpoint(folder, {"p": opt2})
    assert torch.equal(tensors["head"], head) and restored["order"] == [3, 1]
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(2), expected_draw)  # the torch RNG continues where it was saved
    rng2 = random.Random()
    checkpoint.set_python_rng_state(rng2, restored["order_rng"])
    assert rng2.random() == expected_rand


def test_nan_gradient_stops_sft_and_keeps_the_last_good_checkpoint(tmp_path, toy_dir):
    from alignment.errors import UserError
    from alignment.pipeline import Pipeline

    raw = {"name": "nan", "model": str(toy_dir / "model"), "output_dir": str(tmp_path),
           "stages": [{"kind": "sft", "max_steps": 4, "batch_size": 4, "max_samples": 16, "learning_rate": 1e30,
                       "lr_scheduler": "constant", "warmup_ratio": 0.0, "checkpoint_every": 1}]}
    from alignment.config import config_from_dict

    with pytest.raises(UserError, match=r"stages.0 \(sft\): non-finite gradient at step 2"):
        Pipeline(config_from_dict(raw)[0]).run()
    folder = tmp_path / "nan" / "0-sft" / "checkpoints"
    assert [p.name for p in folder.iterdir() if p.is_dir()] == ["checkpoint-1"]
    assert checkpoint.is_complete(folder / "checkpoint-1")
    from safetensors.torch import load_file

    weights = load_file(str(folder / "checkpoint-1" / "policy" / "adapter_model.safetensors"))
    assert all(torch_finite(v) for v in weights.values())


def torch_finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


def test_gradient_norm_spikes_are_logged_and_nan_stops(tmp_path):
    from alignment.guards import GradNormMonitor, NonFiniteError

    monitor = GradNormMonitor("stages.2 (ppo)", tmp_path)
    norms = [1.0, 1.2, 0.9, 1.1, 1.0, 30.0, 1.0]
    assert [monitor.check(i, n) for i, n in enumerate(norms, 1)] == [False] * 5 + [True, False]
    logged = [json.loads(x) for x in (tmp_path / "grad_norm_spikes.jsonl").read_text().splitlines()]
    assert logged == [{"step": 6, "grad_norm": 30.0, "recent_median": 1.0}]
    with pytest.raises(NonFiniteError, match=r"stages.2 \(ppo\): non-finite gradient at step 8"):
        monitor.check(8, float("inf"))


def test_no_eval_and_plugins_imported_only_when_named():
    import ast

    for folder in ("alignment", "stages", "reward_models"):
        for f in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("eval", "exec"):
                    pytest.fail(f"{f}: calls {node.func.id}()")
    code = ("import sys; from alignment.config import load_config; load_config(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith('tests.plugins')))")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "configs" / "sft.yaml")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_a_skipped_stage_whose_artifact_was_deleted_runs_again(tmp_path, toy_dir):
    from alignment.config import config_from_dict
    from alignment.pipeline import Pipeline
    from tests.plugins import echo

    raw = {"name": "chain", "model": str(toy_dir / "model"), "output_dir": str(tmp_path),
           "stages": [{"kind": "tests.plugins.echo:EchoStage", "label": f"s{i}"} for i in range(2)]}
    Pipeline(config_from_dict(raw)[0]).run()
    (tmp_path / "chain" / "0-echostage" / "note.txt").unlink()
    echo.CALLS.clear()
    summary = Pipeline(config_from_dict(raw)[0]).run()
    assert echo.CALLS == ["s0"] and [s["status"] for s in summary["stages"]] == ["done", "skipped"]


def test_vllm_ppo_killed_and_resumed_samples_the_same_rollouts(tmp_path, toy_dir):
    """With the vLLM engine each request samples with its own seed (run seed, iteration, place in the batch), so
    the engine's RNG history does not matter: kill -9 inside PPO, rerun, and every iteration's numbers and the final
    metrics equal an uninterrupted run's."""
    pytest.importorskip("vllm")
    raw = {
        "name": "vllm", "model": str(toy_dir / "model"), "output_dir": str(tmp_path / "runs"),
        "rollout": {"engine": "vllm", "memory_fraction": 0.1},  # a small KV cache: the toy needs little
        "stages": [
            {"kind": "sft", "max_steps": 2, "batch_size": 8, "max_samples": 32},
            {"kind": "ppo", "reward": "toy_gold", "reward_normalization": "running", "iterations": 3,
             "batch_size": 4, "minibatch_size": 2, "max_new_tokens": 8, "checkpoint_every": 1},
        ],
    }
    run, ref, err = killed_and_resumed(tmp_path, raw, "1-ppo:step:2", "1-ppo from iter-00001")
    assert "rollout engine: vllm" in err
    got, want = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    assert [s["status"] for s in got["stages"]] == ["skipped", "done"]
    assert without_timing(got["stages"][1]["metrics"]) == without_timing(want["stages"][1]["metrics"])
    lines, ref_lines = logged(run / "1-ppo"), logged(ref / "1-ppo")
    assert [x["step"] for x in lines] == [1, 2, 3] and lines == ref_lines


def test_adapter_fusion_killed_mid_stage_resumes_to_the_same_fusion(tmp_path, toy_dir):
    """The fusion stage's own loop checkpoints (fusion layers, optimiser, scheduler, RNGs, step, the rest of the
    epoch's order): kill -9 after step 3 (mid-epoch: 24 rows in batches of 8), rerun, and the fusion weights, the
    logged steps and the evaluated routing equal an uninterrupted run's."""
    fast = {"max_steps": 4, "batch_size": 8}
    raw = {
        "name": "fusion", "model": "toy", "output_dir": str(tmp_path / "runs"), "logging": {"log_every": 1},
        "continual": {"evaluate": "all", "eval_samples": 16},
        "stages": [
            {"kind": "sft", "data": "toy:task/sentiment", "adapter_name": "sentiment", **fast},
            {"kind": "sft", "data": "toy:task/number", "adapter_name": "number", **fast},
            {"kind": "adapter_fusion", "adapters": ["sentiment", "number"], "samples_per_task": 12, "max_steps": 5,
             "batch_size": 8, "checkpoint_every": 2},
        ],
    }
    run, ref, _ = killed_and_resumed(tmp_path, raw, "2-adapter_fusion:step:3", "2-adapter_fusion from iter-00002")
    got, want = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    assert [s["status"] for s in got["stages"]] == ["skipped", "skipped", "done"]
    g, w = got["stages"][2], want["stages"][2]
    assert without_timing(g["metrics"]) == without_timing(w["metrics"])
    assert g["fusion_weights"] == w["fusion_weights"] and g["task_accuracy"] == w["task_accuracy"]
    lines, ref_lines = logged(run / "2-adapter_fusion"), logged(ref / "2-adapter_fusion")
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5] and lines == ref_lines
    weights = "2-adapter_fusion/fusion/fusion.safetensors"
    assert (run / weights).read_bytes() == (ref / weights).read_bytes()
    assert not (run / "2-adapter_fusion" / "checkpoints").exists()  # removed once the stage is DONE


def test_a_checkpoint_of_another_number_of_processes_is_refused(tmp_path):
    """Data shards and per-rank states belong to the process count that wrote them: resuming a 2-process checkpoint
    in one process is one clear error, not a silently different run."""
    import random
    from types import SimpleNamespace

    from alignment.errors import UserError

    folder = tmp_path / "1-reward" / "checkpoints" / "iter-00002"
    state = {"python_rng": checkpoint.python_rng_state(random.Random(0)), "world_size": 2}
    checkpoint.save_online_checkpoint(folder, 2, {}, {}, {**state, "ranks": [state, state]})
    ctx = SimpleNamespace(resume=folder, label="stages.1 (reward)", dir=tmp_path / "1-reward")  # no adapters to load
    with pytest.raises(UserError, match=r"stages.1 \(reward\): .*iter-00002 was written by 2 process\(es\), this run "
                                         r"has 1; rerun with the same number of processes"):
        checkpoint.read_stage_checkpoint(ctx, (), {}, {})
