"""The run report, `alignment export` (adapter or merged model) and `alignment generate`, on the SFT session run."""

from __future__ import annotations

import json
import re

import torch

from alignment.toy import world
from tests.conftest import run_cli

PROMPTS = world.eval_prompts(0)[:8]


def test_every_run_writes_a_report(sft_run):
    _, _, run_dir = sft_run
    md = (run_dir / "report.md").read_text()
    # the session's SFT run folder: a later test on the same worker may have re-run it (then the stage is skipped)
    assert re.search(r"\| 0 \| sft \| (done|skipped) \|", md) and "gold_reward" in md and "## Resolved config" in md
    plots = sorted((run_dir / "plots").glob("*.png"))
    assert plots and all(p.stat().st_size > 1000 for p in plots)
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(plots) and "src='plots/" not in html  # self-contained
    proc = run_cli("report", str(run_dir))  # and again on demand
    assert proc.returncode == 0 and proc.stdout.strip().endswith("report.md")


def test_merged_export_loads_with_stock_transformers_and_generates_like_the_framework(sft_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.evaluation import generate_greedy

    pipeline, _, run_dir = sft_run
    proc = run_cli("export", str(run_dir), "--merge", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "merged").iterdir()}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    stock = [text for text, _ in generate_greedy(model, tokenizer, PROMPTS, 24)]

    policy = pipeline.policy()
    with policy.using("policy"):
        ours = [text for text, _ in generate_greedy(policy.model, policy.tokenizer, PROMPTS, 24)]
    assert stock == ours and any("was" in t for t in ours)

    with torch.no_grad():  # and the logits agree, not just the argmax
        batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
        with policy.using("policy") as peft_model:
            expected = peft_model(**batch).logits
        assert torch.allclose(model(**batch).logits, expected, atol=1e-4)

    proc = run_cli("generate", str(run_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "24")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ours[0].strip()


def test_adapter_export_and_bad_folders(sft_run, tmp_path):
    _, _, run_dir = sft_run
    proc = run_cli("export", str(run_dir), "--out", str(tmp_path / "adapter"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    proc = run_cli("export", str(tmp_path), "--merge", str(tmp_path / "x"))
    assert proc.returncode == 2 and "not a run folder (no summary.json)" in proc.stderr
    proc = run_cli("export", str(run_dir), "--out", str(tmp_path / "adapter"))
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr


def test_eval_policy_on_a_run(reward_run, tmp_path):
    _, summary, run_dir = reward_run
    text = tmp_path / "text.txt"
    text.write_text("review of the soup in rome : the soup was good .\nreview of the bus in oslo : the bus was slow .\n")
    out = tmp_path / "eval.json"
    proc = run_cli("eval", "policy", str(run_dir), "--reward", str(run_dir / "1-reward" / "reward_model"),
                   "--against", str(run_dir), "--perplexity", str(text), "--tasks", "toy:task/sentiment",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["gold_reward"] == summary["stages"][0]["metrics"]["gold_reward"]  # the same evaluator as the run
    assert result["win_rate"] == 0.5 and result["win_rate_judge"] == "reward model"  # against itself: all ties
    assert isinstance(result["mean_reward"], float) and 1.0 < result["perplexity"] < 100.0
    assert 0.0 <= result["accuracy/sentiment"] <= 1.0
    proc = run_cli("eval", "policy", str(run_dir), "--perplexity", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "--perplexity: cannot read" in proc.stderr


def test_wandb_logs_every_stage_into_one_group_offline(tmp_path):
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"name: wgroup\noutput_dir: {tmp_path}/runs\nlogging: {{report_to: [wandb], log_every: 1}}\n"
                   "stages:\n  - kind: sft\n    max_steps: 3\n  - kind: dpo\n    max_steps: 2\n    sft_weight: 1.0\n")
    proc = run_cli("run", str(cfg), env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("0-sft", "1-dpo"):
        files = list((tmp_path / "runs" / "wgroup" / stage / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, stage
        record = files[0].read_bytes()  # wandb's offline log (protobuf records): the names are stored verbatim
        assert b"wgroup" in record and f"wgroup/{stage}".encode() in record  # group = run name, one run per stage
        assert b"gold_reward" in record and b"learning_rate" in record  # final metrics and the stage's config
