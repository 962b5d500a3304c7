"""The bad-input catalogue (docs/errors.md): every case ends as one `error: ...` line naming the file/field and what to
do, exit code 2, no traceback, and nothing half-written (no temp files, no DONE, no artifact of the failing stage).

Each case builds its bad input in a temporary folder and runs the real CLI entry point (`alignment.app.cli.main`, the
function `python -m alignment` calls) in-process; the disk-full case runs it in a subprocess under RLIMIT_FSIZE.
Most cases fail in validation or at data loading, before any model is loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from alignment.app.cli import main
from tests.conftest import REPO
from tests.forked import run_forked

CASES = {}


def case(needle: str):
    """Register a case: the function builds the input in ``tmp`` and returns the CLI arguments."""

    def register(fn):
        CASES[fn.__name__] = (fn, needle)
        return fn

    return register


@pytest.fixture(scope="module")
def trained(toy_dir, tmp_path_factory):
    """A finished one-step SFT run on the toy model (by path, so no gold evaluation): (run root, config dict)."""
    root = tmp_path_factory.mktemp("trained")
    raw = config(root, toy_dir, [sft(max_steps=1)], name="base")
    assert main(["run", str(write_yaml(root / "base.yaml", raw))]) == 0
    return root, raw


def sft(**fields):
    return {"kind": "sft", "max_steps": 2, "batch_size": 4, "max_samples": 16, **fields}


def config(tmp: Path, toy_dir: Path, stages: list, **top) -> dict:
    return {"name": "bad", "model": str(toy_dir / "model"), "output_dir": str(tmp / "runs"), "stages": stages, **top}


def write_yaml(path: Path, raw) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(tmp, toy_dir, stages, **top) -> list[str]:
    return ["run", str(write_yaml(tmp / "c.yaml", config(tmp, toy_dir, stages, **top)))]


def validate(tmp, toy_dir, stages, **top) -> list[str]:
    return ["validate", str(write_yaml(tmp / "c.yaml", config(tmp, toy_dir, stages, **top)))]


def data(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def model_copy(tmp: Path, toy_dir: Path) -> Path:
    target = tmp / "model-copy"
    shutil.copytree(toy_dir / "model", target)
    return target


# ------------------------------------------------------------------------------------ configs (validation)


@case("malformed YAML at line 4")
def malformed_yaml(tmp, toy_dir, trained):
    (tmp / "c.yaml").write_text("name: x\nstages:\n  - kind: sft\n   epochs: [1\n")
    return ["validate", str(tmp / "c.yaml")]


@case("file not found; check the path")
def config_not_found(tmp, toy_dir, trained):
    return ["run", str(tmp / "missing.yaml")]


@case("the file is not UTF-8 text; save it as UTF-8")
def config_not_utf8(tmp, toy_dir, trained):
    (tmp / "c.yaml").write_bytes("name: caf\xe9\nstages: [{kind: sft}]\n".encode("latin-1"))
    return ["validate", str(tmp / "c.yaml")]


@case("must be a YAML mapping with `name:` and `stages:`, got list")
def config_not_a_mapping(tmp, toy_dir, trained):
    (tmp / "c.yaml").write_text("- kind: sft\n")
    return ["validate", str(tmp / "c.yaml")]


@case("modle: unknown key; did you mean `model`?")
def unknown_top_level_key(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft()], modle="toy")


@case("stages.0.learning_rat: unknown key; did you mean `learning_rate`?")
def unknown_stage_key(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft(learning_rat=1e-3)])


@case("seed: Input should be a valid integer")
def wrong_type(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft()], seed="abc")


@case("stages.0.learning_rate: Input should be greater than 0 (got -0.001)")
def out_of_range_learning_rate(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft(learning_rate=-1e-3)])


@case("adapter.dropout: Input should be less than 1 (got 1.5)")
def out_of_range_dropout(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft()], adapter={"dropout": 1.5})


@case("stages.0.long_prompts: Input should be 'truncate' or 'refuse'")
def wrong_choice(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft(long_prompts="cut")])


@case("stages.1.top_p: top_p below 1 samples from a truncated distribution, but the trainer's log-probs")
def top_p_below_one(tmp, toy_dir, trained):
    """Online stages refuse nucleus sampling (PPO, GRPO, RLOO share the field): see README, PPO settings."""
    return validate(tmp, toy_dir, [sft(), {"kind": "grpo", "reward": "toy_gold", "top_p": 0.9}])


@case("stages.0.kind: unknown stage kind 'sfft'; did you mean 'sft'?")
def unknown_stage_kind(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [{"kind": "sfft"}])


@case("stages.0: each stage needs a `kind:`")
def stage_without_kind(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [{"epochs": 1}])


@case("stages: List should have at least 1 item")
def no_stages(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [])


@case("stages.0.kind: cannot import stage module 'no_such_pkg.stage'")
def plugin_not_importable(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [{"kind": "no_such_pkg.stage:MyStage"}])


@case("stages.0.kind: a 'dpo' stage needs the `policy` artifact but no earlier stage produces it")
def broken_artifact_chain(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [{"kind": "dpo"}])


@case("not found (paths are relative to the directory you run from)")
def missing_data_file(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft(data=str(tmp / "nope.jsonl"))])


@case("has an unknown extension; use one of .jsonl, .json, .csv, .parquet")
def unknown_data_extension(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft(data=data(tmp, "d.txt", "hello\n"))])


@case("stages.0.data: unknown toy dataset 'toy:sfft'; did you mean `toy:sft`?")
def unknown_toy_dataset(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft(data="toy:sfft")])


@case("does not exist; use `toy`, a local model folder or a hub id")
def missing_model_path(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft()], model=str(tmp / "no-model"))


@case("has no config.json; point at a transformers model folder")
def model_folder_without_config(tmp, toy_dir, trained):
    (tmp / "empty-model").mkdir()
    return validate(tmp, toy_dir, [sft()], model=str(tmp / "empty-model"))


@case("must look like key.path=value")
def malformed_override(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft()]) + ["stages.0.epochs"]


@case("stages.3: override 'stages.3.epochs=2' names no existing list item")
def override_of_missing_stage(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft()]) + ["stages.3.epochs=2"]


@case("name: String should match pattern")
def invalid_run_name(tmp, toy_dir, trained):
    return validate(tmp, toy_dir, [sft()], name="../escape")


@case("could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'")
def yaml_python_tag_refused(tmp, toy_dir, trained):
    marker = tmp / "pwned"
    (tmp / "c.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nstages: [{{kind: sft}}]\n")
    return ["validate", str(tmp / "c.yaml")]


@case("holds only pickle weights (pytorch_model.bin), which can run code when loaded")
def pickle_model_weights(tmp, toy_dir, trained):
    folder = model_copy(tmp, toy_dir)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return validate(tmp, toy_dir, [sft()], model=str(folder))


@case("ships its own Python code (auto_map in config.json); set `trust_remote_code: true` only if you trust it")
def remote_code_model(tmp, toy_dir, trained):
    folder = model_copy(tmp, toy_dir)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    return validate(tmp, toy_dir, [sft()], model=str(folder))


# ------------------------------------------------------------------------------------- data (at loading)


@case("not UTF-8 text; re-save the file as UTF-8")
def data_not_utf8(tmp, toy_dir, trained):
    latin1 = '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1")
    return run(tmp, toy_dir, [sft(data=data(tmp, "d.jsonl", latin1))])


@case("holds no rows; give it at least one example")
def empty_data(tmp, toy_dir, trained):
    return run(tmp, toy_dir, [sft(data=data(tmp, "d.jsonl", "\n"))])


@case("line 2 is not valid JSON")
def invalid_jsonl_line(tmp, toy_dir, trained):
    return run(tmp, toy_dir, [sft(data=data(tmp, "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n'))])


@case("not a readable parquet file")
def unreadable_parquet(tmp, toy_dir, trained):
    return run(tmp, toy_dir, [sft(data=data(tmp, "d.parquet", b"PAR1 this is not parquet"))])


@case("stages.0.data: '{d}' needs columns prompt/completion or messages or text; columns found: answer, question")
def missing_columns(tmp, toy_dir, trained):
    return run(tmp, toy_dir, [sft(data=data(tmp, "d.jsonl", '{"question": "a", "answer": "b"}\n'))])


@case("has no column(s) query named in `columns`")
def columns_mapping_names_missing_column(tmp, toy_dir, trained):
    d = data(tmp, "d.jsonl", '{"question": "a", "answer": "b"}\n')
    return run(tmp, toy_dir, [sft(data=d, columns={"prompt": "query", "completion": "answer"})])


@case("row 2 has an empty prompt/completion; fill or drop it")
def empty_field(tmp, toy_dir, trained):
    d = data(tmp, "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n')
    return run(tmp, toy_dir, [sft(data=d)])


@case("stages.1.data: '{d}' line 3: label must be true/false (desirable or not), got 'maybe'")
def wrong_label_values(tmp, toy_dir, trained):
    # the second row is on line 3 of the file (the blank line counts): the error names the line an editor shows
    d = data(tmp, "d.jsonl", '{"prompt": "a", "completion": "b", "label": true}\n\n'
                             '{"prompt": "a", "completion": "b", "label": "maybe"}\n')
    return after_trained(tmp, trained, {"kind": "kto", "data": d, "max_steps": 1})


@case("every pair in")
def preference_pairs_without_signal(tmp, toy_dir, trained):
    d = data(tmp, "d.jsonl", '{"prompt": "a", "chosen": " same", "rejected": " same"}\n')
    return after_trained(tmp, trained, {"kind": "dpo", "data": d, "max_steps": 1})


@case("stages.0.data: 1 of 2 prompts do not fit max_length 16 with their answers (the longest prompt has 51 tokens)")
def prompt_longer_than_max_length(tmp, toy_dir, trained):
    d = data(tmp, "d.jsonl", json.dumps({"prompt": "the food was good . " * 10, "completion": " yes"}) + "\n"
             + json.dumps({"prompt": "short", "completion": " yes"}) + "\n")
    return run(tmp, toy_dir, [sft(data=d, max_length=16, long_prompts="refuse", eval_fraction=0.0)])


@case("stages.1.data: 1 of 1 prompts do not fit max_length 16 with their answers (the longest prompt has 51 tokens)")
def preference_prompt_longer_than_max_length(tmp, toy_dir, trained):
    d = data(tmp, "d.jsonl", json.dumps({"prompt": "the food was good . " * 10, "chosen": " yes", "rejected": " no"}))
    return after_trained(tmp, trained, {"kind": "dpo", "data": d, "max_length": 16, "long_prompts": "refuse",
                                        "eval_fraction": 0.0})


@case("stages.1.data: 1 of 2 pairs cannot be trained on at max_length 16 (answer longer than max_length even with "
      "the prompt cut to its start: 1), more than max_dropped_fraction 0.2; raise `max_length`")
def too_many_pairs_dropped(tmp, toy_dir, trained):
    long = " the soup was good" + " and fresh" * 10 + " ."
    d = data(tmp, "d.jsonl", json.dumps({"prompt": "review of the soup in paris :", "chosen": long, "rejected": " no"})
             + "\n" + json.dumps({"prompt": "review of the tea in rome :", "chosen": " yes", "rejected": " no"}) + "\n")
    return after_trained(tmp, trained, {"kind": "dpo", "data": d, "max_length": 16, "eval_fraction": 0.0})


# ------------------------------------------------------------------------------------ models and artifacts


@case("has no eos token; set `eos_token` in its tokenizer_config.json")
def tokenizer_without_eos(tmp, toy_dir, trained):
    folder = model_copy(tmp, toy_dir)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.exists():
            cfg = json.loads(f.read_text())
            for key in ("pad_token", "eos_token", "unk_token", "bos_token"):
                cfg.pop(key, None)
            f.write_text(json.dumps(cfg))
    gen = folder / "generation_config.json"
    gen.unlink(missing_ok=True)
    return run(tmp, toy_dir, [sft()], model=str(folder))


def after_trained(tmp, trained, stage: dict, mutate=None, **top) -> list[str]:
    """A copy of the trained SFT run (its stage is skipped), optionally ``mutate``d (called with its policy adapter
    folder), rerun with ``stage`` added after it."""
    root, raw = trained
    shutil.copytree(root / "runs", tmp / "runs")
    if mutate is not None:
        mutate(tmp / "runs" / "base" / "0-sft" / "adapters" / "policy")
    full = {**raw, "output_dir": str(tmp / "runs"), "stages": raw["stages"] + [stage], **top}
    return ["run", str(write_yaml(tmp / "c.yaml", full))]


def _continue(tmp, trained, mutate):
    return after_trained(tmp, trained, sft(max_steps=1), mutate)


@case("adapter was trained on base")
def adapter_from_another_base(tmp, toy_dir, trained):
    (tmp / "other-base").mkdir()

    def other_base(folder):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(tmp / "other-base")
        (folder / "adapter_config.json").write_text(json.dumps(cfg))

    return _continue(tmp, trained, other_base)


@case("corrupted adapter weights (Error while deserializing header")
def corrupted_safetensors(tmp, toy_dir, trained):
    def truncate(folder):
        f = folder / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    return _continue(tmp, trained, truncate)


@case("no adapter_model.safetensors (found pickle adapter_model.bin: convert it to safetensors)")
def pickle_adapter(tmp, toy_dir, trained):
    return _continue(tmp, trained, lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"))


@case("was made with model")
def run_name_reused_with_another_model(tmp, toy_dir, trained):
    root, raw = trained
    shutil.copytree(root / "runs", tmp / "runs")
    other = model_copy(tmp, toy_dir)
    return ["run", str(write_yaml(tmp / "c.yaml", {**raw, "model": str(other), "output_dir": str(tmp / "runs")}))]


@case("stages.1.reward: cannot load 'no_such_module:score' (No module named 'no_such_module'); check the module")
def reward_function_not_importable(tmp, toy_dir, trained):
    return after_trained(tmp, trained, {"kind": "grpo", "reward": "no_such_module:score", "iterations": 1})


@case("stages.1 (grpo): non-finite reward at step 1")
def reward_function_returns_nan(tmp, toy_dir, trained):
    ppo = {"kind": "grpo", "reward": "tests.plugins.bad_reward:nan_reward", "iterations": 2, "batch_size": 2,
           "group_size": 2, "minibatch_size": 4, "max_new_tokens": 4, "reward_normalization": "none"}
    return after_trained(tmp, trained, ppo, rollout={"engine": "hf"})


@case("stages.0 (sft): non-finite gradient at step 2")
def learning_rate_blows_up(tmp, toy_dir, trained):
    # a loss scaled to inf is what a diverging run produces; here a huge learning rate makes step 2's loss inf,
    # and `max_grad_norm` cannot rescue an inf gradient
    return run(tmp, toy_dir, [sft(learning_rate=1e30, max_steps=4, lr_scheduler="constant", warmup_ratio=0.0)])


# ----------------------------------------------------------------------------------------------- the test


def _leftovers(root: Path) -> list[str]:
    """Half-written things: temp files/folders of atomic writes, incomplete checkpoints."""
    bad = []
    for p in root.rglob("*"):
        if p.name.endswith(".tmp") or (p.name.startswith(".") and p.is_dir()):
            bad.append(str(p))
        if p.parent.name == "checkpoints" and p.is_dir() and not (p / "COMPLETE").exists():
            bad.append(str(p))
    return bad


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, toy_dir, trained, capsys):
    build, needle = CASES[name]
    argv = build(tmp_path, toy_dir, trained)
    needle = needle.replace("{d}", str(tmp_path / "d.jsonl"))
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    # (a progress bar may share the line: the error starts wherever the bar left the cursor)
    lines = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert len(lines[0]) < 400
    assert not _leftovers(tmp_path)
    summary = tmp_path / "runs" / "base" / "summary.json"
    summary = summary if summary.exists() else tmp_path / "runs" / "bad" / "summary.json"
    if summary.exists():  # the failing stage is recorded as failed and finished nothing
        failed = [s for s in json.loads(summary.read_text())["stages"] if s["status"] == "failed"]
        for entry in failed:
            folder = summary.parent / entry["dir"]
            assert not (folder / "DONE").exists() and not (folder / "adapters").exists()
    assert not (tmp_path / "pwned").exists()


def test_catalogue_is_documented():
    text = (REPO / "docs" / "errors.md").read_text()
    missing = [name for name in CASES if f"`{name}`" not in text]
    assert not missing and len(CASES) >= 30


def test_disk_full_while_writing_a_checkpoint(tmp_path, toy_dir):
    """RLIMIT_FSIZE makes every write past 1 MB fail with EFBIG (Python ignores SIGXFSZ): the SFT checkpoint's
    optimiser state (1.3 MB) cannot be written. One error line, exit 2, the partial checkpoint removed; the rerun
    without the limit resumes from nothing and finishes."""
    argv = run(tmp_path, toy_dir, [sft(max_steps=2, checkpoint_every=1, batch_size=8)])

    rc, err = run_forked(argv, tmp_path / "stderr.txt", fsize_limit=1_000_000)
    assert rc == 2, err[-2000:]
    lines = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert "stages.0 (sft): no space left writing into" in lines[0] and "(EFBIG)" in lines[0]
    stage = tmp_path / "runs" / "bad" / "0-sft"
    assert not (stage / "DONE").exists() and not _leftovers(tmp_path)
    assert not any(p.is_dir() for p in (stage / "checkpoints").iterdir())
