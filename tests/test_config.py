"""Config loading: overrides, every problem at once, kind overrides, did-you-mean, shipped YAMLs."""

from __future__ import annotations

import sys

import pytest

from alignment.config import config_from_dict, load_config
from alignment.errors import ConfigError
from tests.conftest import REPO, run_cli

ECHO = "tests.plugins.echo:EchoStage"


def base(**extra):
    return {"name": "t", "stages": [{"kind": "sft", "epochs": 1}], **extra}


def test_defaults_and_overrides():
    cfg, warnings = config_from_dict(base(), ["name=exp2", "stages.0.epochs=2", "adapter.r=8", "dtype=bfloat16"])
    assert cfg.name == "exp2" and cfg.dtype == "bfloat16" and cfg.adapter.r == 8
    assert cfg.stages[0].epochs == 2.0 and type(cfg.stages[0]).__name__ == "SFTConfig"
    assert cfg.output_dir == "runs" and cfg.model == "toy" and cfg.rollout.memory_fraction == 0.3
    assert warnings == []


def test_stage_adapter_override_wins():
    cfg, _ = config_from_dict(base(adapter={"r": 4}), ["stages.0.adapter.r=32"])
    assert cfg.adapter.r == 4 and cfg.adapter_for(cfg.stages[0]).r == 32


def test_four_mistakes_reported_at_once():
    raw = {
        "name": "bad",
        "modle": "toy",
        "seed": "abc",
        "stages": [{"kind": "sft", "learning_rat": 1e-3, "data": "data/missing.jsonl"}, {"kind": "sfft"}],
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    text = "\n".join(err.value.problems)
    assert "modle: unknown key; did you mean `model`?" in text
    assert "seed: " in text
    assert "stages.0.learning_rat: unknown key; did you mean `learning_rate`?" in text
    assert "stages.0.data: data file 'data/missing.jsonl' not found" in text
    assert "stages.1.kind: unknown stage kind 'sfft'; did you mean 'sft'?" in text
    assert len(err.value.problems) == 5


def test_validate_cli_names_all_mistakes_exit_2_without_loading_a_model(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nmodle: toy\nstages:\n  - kind: sft\n    epochs: -1\n    learning_rat: 1e-3\n"
        "  - kind: tests.plugins.echo:NeedsPolicyStage\n    other: x\n"
    )
    # a fresh interpreter: prove no model (not even torch) was loaded
    code = (
        "import sys; from alignment.app.cli import main; rc = main(['validate', %r]); "
        "assert 'torch' not in sys.modules, 'validate imported torch'; sys.exit(rc)" % str(bad)
    )
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "4 problems" in err
    for needle in ("modle:", "stages.0.epochs:", "stages.0.learning_rat:", "stages.1.other:"):
        assert needle in err


def test_broken_artifact_chain():
    raw = {"name": "t", "model": "toy", "stages": [{"kind": "tests.plugins.echo:NeedsPolicyStage"}, {"kind": "sft"}]}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.problems == [
        "stages.0.kind: a 'tests.plugins.echo:NeedsPolicyStage' stage needs the `policy` artifact but no earlier "
        "stage produces it; add a stage that does before it (see `alignment stages`)"
    ]
    config_from_dict({**raw, "stages": [{"kind": "sft"}, {"kind": "tests.plugins.echo:NeedsPolicyStage"}]})


def test_kind_override_rereads_the_stage_and_warns_about_dropped_fields():
    raw = {"name": "t", "stages": [{"kind": "sft", "epochs": 3, "learning_rate": 1e-4, "adapter": {"r": 4}}]}
    cfg, warnings = config_from_dict(raw, [f"stages.0.kind={ECHO}"])
    stage = cfg.stages[0]
    assert type(stage).__name__ == "EchoConfig" and stage.value == 1.0  # missing fields take defaults
    assert stage.adapter.r == 4  # common fields survive
    assert warnings == [f"stages.0: kind changed to {ECHO!r}; dropped fields it does not have: epochs, learning_rate"]


def test_override_errors_are_collected():
    with pytest.raises(ConfigError) as err:
        config_from_dict(base(), ["stages.5.epochs=2", "nonsense", "seed=1"])
    text = "\n".join(err.value.problems)
    assert "stages.5: override 'stages.5.epochs=2' names no existing list item" in text
    assert "override 'nonsense' must look like key.path=value" in text


def test_malformed_yaml_names_the_line(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: x\nstages:\n  - kind: sft\n   epochs: [1\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert "malformed YAML at line" in err.value.problems[0]


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert "file not found" in str(err.value)


def test_unknown_toy_dataset_and_model_path(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"name": "t", "model": str(tmp_path / "nomodel"), "stages": [{"kind": "sft", "data": "toy:sf"}]})
    text = "\n".join(err.value.problems)
    assert "stages.0.data: unknown toy dataset 'toy:sf'; did you mean `toy:sft`?" in text
    assert "model: model path" in text and "does not exist" in text


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_config_validates(path):
    cfg, _ = load_config(path)
    assert cfg.stages


def test_quickstart_config_validates():
    from alignment.app.cli import QUICKSTART

    cfg, _ = load_config(QUICKSTART)
    assert cfg.name == "quickstart" and cfg.model == "toy"


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    proc = run_cli("run", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_unused_reward_stage_warns():
    raw = {"name": "t", "stages": [{"kind": "sft"}, {"kind": "reward"}, {"kind": "dpo"}]}
    _, warnings = config_from_dict(raw)
    assert warnings == ["stages.1: the 'reward' stage produces reward_model but no later stage uses it"]
    _, warnings = config_from_dict({"name": "t", "stages": [{"kind": "sft"}, {"kind": "reward"}]})
    assert warnings == []


def test_quickstart_runs_the_sft_rm_ppo_chain():
    from alignment.app.cli import QUICKSTART

    quick, _ = load_config(QUICKSTART)
    chain, _ = load_config(REPO / "configs" / "sft_rm_ppo.yaml")
    assert [s.model_dump() for s in quick.stages] == [s.model_dump() for s in chain.stages]
    assert quick.adapter == chain.adapter and quick.rollout == chain.rollout


def test_source_is_not_a_user_key():
    with pytest.raises(ConfigError, match="source: unknown key"):
        config_from_dict(base(source="x.yaml"))
    cfg, _ = load_config(REPO / "configs" / "sft.yaml")
    assert cfg.source.endswith("sft.yaml") and "source" not in cfg.resolved()
