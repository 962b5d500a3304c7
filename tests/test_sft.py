"""SFT on the real toy model with TRL: it learns, touches only the adapter, and saves a stock peft folder."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli


def test_sft_raises_gold_over_base(sft_run):
    _, summary, _ = sft_run
    stage = summary["stages"][0]
    assert stage["status"] == "done" and stage["kind"] == "sft" and stage["dir"] == "0-sft"
    metrics = stage["metrics"]
    assert metrics["gold_reward"] >= summary["base_gold_reward"] + 0.15
    base = json.loads((sft_run[2] / "base_eval.json").read_text())
    assert metrics["gold_content"] > base["gold_content"]
    assert stage["artifacts"] == {"policy": "0-sft/adapters/policy"}
    assert {"train_loss", "eval_loss", "gold_reward", "gold_content"} <= set(metrics)
    assert isinstance(stage["wall_time_s"], float)


def test_adapter_changed_and_base_did_not(sft_run, toy_dir):
    pipeline, _, _ = sft_run
    policy = pipeline.policy()
    original = load_file(toy_dir / "model" / "model.safetensors")
    base_state = policy.base.state_dict() if policy.model is policy.base else policy.model.get_base_model().state_dict()
    compared = 0
    for name, tensor in base_state.items():
        key = name.replace("base_layer.", "")
        if "lora_" in name or key not in original:
            continue
        assert torch.equal(tensor, original[key]), f"base weight {name} changed"
        compared += 1
    assert compared >= 30
    adapter = policy.adapter_state("policy")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: every one was trained


def test_adapter_loads_with_stock_peft_and_matches(sft_run, toy_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pipeline, _, run_dir = sft_run
    policy = pipeline.policy()
    adapter_dir = run_dir / "0-sft" / "adapters" / "policy"
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_dir / "model"), adapter_dir).eval()
    batch = policy.tokenizer(["review of the soup in paris :"], return_tensors="pt")
    policy.activate("policy")
    with torch.no_grad():
        ours = policy.model(**batch).logits
        theirs = stock(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_metrics_files(sft_run):
    _, _, run_dir = sft_run
    lines = [json.loads(x) for x in (run_dir / "0-sft" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("step" in x for x in lines) and any("loss" in x for x in lines)
    assert (run_dir / "0-sft" / "DONE").exists() and (run_dir / "manifest.json").exists()


def test_rerun_from_cli_skips_everything(sft_run):
    _, _, run_dir = sft_run
    proc = run_cli("run", str(REPO / "configs" / "sft.yaml"), f"output_dir={run_dir.parent}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["skipped"]
    assert "unchanged since its last run: skipped" in proc.stderr


def test_toy_data_with_any_checkpoint_is_judged_by_the_gold_evaluator(toy_dir, tmp_path):
    """`model: <a folder>` with `toy:` data: the run reports base and stage gold, as for `model: toy`. The folder here
    holds the toy base itself, so its base gold is the toy base's (the build gate's figure on the same prompts)."""
    from alignment.pipeline import Pipeline

    summary = Pipeline.from_yaml(REPO / "configs" / "sft.yaml", [f"model={toy_dir / 'model'}", f"output_dir={tmp_path}",
                                                                 "stages.0.max_steps=5"]).run()
    gate = json.loads((toy_dir / "world.json").read_text())["gate"]
    assert summary["base_gold_reward"] == gate["gold_reward"]
    assert {"gold_reward", "gold_content", "gold_format"} <= set(summary["stages"][0]["metrics"])
