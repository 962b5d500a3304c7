"""Runner: run folder layout, skip unchanged stages, re-run a changed stage and all after it, run-name reuse."""

from __future__ import annotations

import json

import pytest

from alignment.errors import UserError
from alignment.pipeline import Pipeline
from alignment.config import config_from_dict
from tests.plugins import echo

ECHO = "tests.plugins.echo:EchoStage"


def make(tmp_path, toy_dir, *overrides, model=None):
    raw = {
        "name": "chain",
        "model": model or str(toy_dir / "model"),  # a real model folder, never loaded by these stages
        "output_dir": str(tmp_path),
        "stages": [{"kind": ECHO, "label": f"s{i}", "value": float(i)} for i in range(3)],
    }
    cfg, warnings = config_from_dict(raw, list(overrides))
    return Pipeline(cfg, warnings)


def test_folder_layout_and_summary(tmp_path, toy_dir):
    echo.CALLS.clear()
    summary = make(tmp_path, toy_dir).run()
    run = tmp_path / "chain"
    assert [s["status"] for s in summary["stages"]] == ["done"] * 3
    assert [s["dir"] for s in summary["stages"]] == ["0-echostage", "1-echostage", "2-echostage"]
    for i in range(3):
        d = run / f"{i}-echostage"
        for f in ("config.yaml", "metrics.jsonl", "metrics.json", "DONE", "note.txt"):
            assert (d / f).exists(), f
        assert json.loads((d / "metrics.json").read_text()) == {"value": float(i)}
        assert json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["value"] == float(i)
    assert summary["stages"][2]["artifacts"] == {"note": "2-echostage/note.txt"}
    assert json.loads((run / "summary.json").read_text()) == summary
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"][1]["outputs"] == {"note": "1-echostage/note.txt"}
    assert "torch" in manifest["packages"] and "transformers" in manifest["packages"]
    assert "base_gold_reward" not in summary  # only for the toy model


def test_rerun_skips_finished_and_reruns_changed_and_later(tmp_path, toy_dir):
    echo.CALLS.clear()
    make(tmp_path, toy_dir).run()
    assert echo.CALLS == ["s0", "s1", "s2"]
    echo.CALLS.clear()
    again = make(tmp_path, toy_dir).run()
    assert echo.CALLS == [] and [s["status"] for s in again["stages"]] == ["skipped"] * 3
    assert again["stages"][1]["metrics"] == {"value": 1.0}  # a skipped stage keeps its recorded metrics
    echo.CALLS.clear()
    changed = make(tmp_path, toy_dir, "stages.1.value=7").run()
    assert echo.CALLS == ["s1", "s2"]
    assert [s["status"] for s in changed["stages"]] == ["skipped", "done", "done"]
    assert changed["stages"][1]["metrics"] == {"value": 7.0}


def test_unfinished_stage_runs_again(tmp_path, toy_dir):
    make(tmp_path, toy_dir).run()
    (tmp_path / "chain" / "2-echostage" / "DONE").unlink()
    echo.CALLS.clear()
    make(tmp_path, toy_dir).run()
    assert echo.CALLS == ["s2"]


def test_run_name_reused_with_another_model(tmp_path, toy_dir):
    make(tmp_path, toy_dir).run()
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(UserError, match="was made with model .* choose another `name=` or delete"):
        make(tmp_path, toy_dir, model=str(other)).run()


def test_failed_stage_is_recorded(tmp_path, toy_dir):
    pipeline = make(tmp_path, toy_dir)

    class Boom(RuntimeError):
        pass

    def explode(self, ctx):
        raise Boom("x")

    original = echo.EchoStage.run
    echo.EchoStage.run = explode
    try:
        with pytest.raises(Boom):
            pipeline.run()
    finally:
        echo.EchoStage.run = original
    summary = json.loads((tmp_path / "chain" / "summary.json").read_text())
    assert summary["stages"][-1]["status"] == "failed"
    assert not (tmp_path / "chain" / "0-echostage" / "DONE").exists()


def test_registry_lists_builtins_and_rejects_non_stage():
    from alignment.errors import ConfigError
    from alignment.registry import describe_stages, resolve_kind

    kinds = [k for k, _, _ in describe_stages()]
    assert "sft" in kinds
    with pytest.raises(ConfigError, match="is not a stage"):
        resolve_kind("tests.plugins.echo:EchoConfig")
    with pytest.raises(ConfigError, match="cannot import stage module"):
        resolve_kind("no_such_pkg.mod:Thing")


def test_rollout_settings_only_rerun_online_stages(tmp_path, toy_dir):
    make(tmp_path, toy_dir).run()
    echo.CALLS.clear()
    again = make(tmp_path, toy_dir, "rollout.sync=lora", "rollout.engine=hf", "logging.log_every=3").run()
    assert echo.CALLS == [] and [s["status"] for s in again["stages"]] == ["skipped"] * 3
    echo.CALLS.clear()
    make(tmp_path, toy_dir, "seed=1").run()  # the seed does matter
    assert echo.CALLS == ["s0", "s1", "s2"]


def test_ppo_fingerprint_depends_on_rollout():
    from alignment.config import config_from_dict

    raw = {"name": "t", "stages": [{"kind": "sft"}, {"kind": "ppo", "reward": "toy_gold"}]}
    a, _ = config_from_dict(raw)
    b, _ = config_from_dict(raw, ["rollout.sync=lora"])
    assert a.stage_fingerprint(0, "") == b.stage_fingerprint(0, "")
    assert a.stage_fingerprint(1, "x") != b.stage_fingerprint(1, "x")
