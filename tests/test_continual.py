"""Continual chains on the real toy model with real TRL trainers and peft adapters (short runs: a few steps each).

The figures of the full toy configs (docs/continual.md) come from `alignment run configs/continual_*.yaml`; these
tests check the machinery: the accuracy matrix and its metrics in summary.json, the EWC penalty and its artifact,
the fusion stage and its routing, replay, multi-task weights, validation, skip/re-run.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import config_from_dict
from alignment.errors import ConfigError
from alignment.pipeline import Pipeline
from tests.conftest import REPO, expect_gain, run_cli

FAST = {"max_steps": 40, "batch_size": 8, "learning_rate": 2.0e-3}
CONTINUAL = {"evaluate": "all", "eval_samples": 48}


def chain(tmp_path, name: str, stages: list[dict], **top):
    raw = {"name": name, "model": "toy", "output_dir": str(tmp_path), "logging": {"log_every": 20},
           "continual": CONTINUAL, "stages": stages, **top}
    config, warnings = config_from_dict(raw)
    return Pipeline(config, warnings)


def task(kind: str, name: str, **extra) -> dict:
    return {"kind": kind, "data": f"toy:task/{name}", **FAST, **extra}


@pytest.fixture(scope="module")
def seq_run(toy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    stages = [task("sft", "sentiment"), task("sft", "topic", replay=0.05)]
    pipeline = chain(out, "seq", stages)
    return pipeline, pipeline.run(), out / "seq"


def test_continual_block_in_summary(seq_run):
    _, summary, run_dir = seq_run
    block = summary["continual"]
    assert {"tasks", "acc_matrix", "avg_acc", "bwt", "fwt", "forgetting"} <= set(block)
    assert block["tasks"] == ["sentiment", "topic"]
    assert len(block["acc_matrix"]) == 2 and all(len(row) == 2 for row in block["acc_matrix"])
    assert all(0.0 <= v <= 1.0 for row in block["acc_matrix"] for v in row)
    acc, base = block["acc_matrix"], block["baseline"]
    assert block["bwt"] == pytest.approx(acc[1][0] - acc[0][0], abs=1e-4)
    assert block["fwt"] == pytest.approx(acc[0][1] - base[1], abs=1e-4)
    assert block["avg_acc"] == pytest.approx((acc[1][0] + acc[1][1]) / 2, abs=1e-4)
    # on toy v15, 40 steps learned the sentiment task well above the base model; toy v16's tasks are not calibrated
    # yet (issue 19, item 5), so the target xfails with its figures while unmet (after the summary contract below)
    # the rest of the summary contract is unchanged
    assert [s["status"] for s in summary["stages"]] == ["done", "done"] and "base_gold_reward" in summary
    assert summary["stages"][0]["task_accuracy"] == {"sentiment": acc[0][0], "topic": acc[0][1]}
    assert summary["stages"][1]["metrics"]["replay_samples"] == 60  # 5 % of sentiment's 1200 training rows
    assert json.loads((run_dir / "summary.json").read_text())["continual"] == block
    expect_gain(acc[0][0], base[0], 0.2, "sentiment accuracy after 40 steps over the base model")
    assert (run_dir / "continual.md").read_text().count("|") > 10
    assert (run_dir / "continual.png").read_bytes()[:4] == b"\x89PNG"
    assert set(json.loads((run_dir / "continual_base.json").read_text())["accuracy"]) == {"sentiment", "topic"}


def test_rerun_skips_and_keeps_the_block_and_a_new_setting_reruns_the_chain(seq_run, tmp_path):
    pipeline, summary, run_dir = seq_run
    again = Pipeline(pipeline.config).run()
    assert [s["status"] for s in again["stages"]] == ["skipped", "skipped"]
    assert again["continual"] == summary["continual"]
    config, _ = config_from_dict({**pipeline.config.resolved(), "continual": {**CONTINUAL, "eval_samples": 40}})
    fingerprints = Pipeline(config).fingerprints()
    assert fingerprints[0] != pipeline.fingerprints()[0]  # a chain stage's result includes its evaluation


def test_accuracy_is_the_answer_words_log_likelihood(seq_run):
    """The evaluator's batched scores equal one-by-one log-probs, and its accuracy is the argmax over the answers."""
    from alignment.continual import completion_scores, load_task, task_accuracy
    from alignment.evaluation import completion_logprobs

    pipeline, _, _ = seq_run
    policy = pipeline.policy()
    examples = load_task(pipeline._chains()[1].spec("topic"), 0).eval[:6]
    prompts = [e["prompt"] for e in examples for _ in e["choices"]]
    choices = [c for e in examples for c in e["choices"]]
    batched = completion_scores(policy.model, policy.tokenizer, prompts, choices, batch_size=4)
    single = completion_logprobs(policy.model, policy.tokenizer, prompts, choices)
    assert batched == pytest.approx(single, abs=1e-4)
    right = sum(max(range(2), key=lambda k, i=i: batched[2 * i + k]) == e["answer"] for i, e in enumerate(examples))
    assert task_accuracy(policy.model, policy.tokenizer, examples) == pytest.approx(right / 6)


def test_ewc_chain_saves_fisher_with_anchor_and_trains_under_the_penalty(toy_dir, tmp_path):
    stages = [task("ewc", "sentiment", ewc_lambda=50.0, fisher_samples=16),
              task("ewc", "topic", ewc_lambda=50.0, fisher_samples=16)]
    summary = chain(tmp_path, "ewc", stages).run()
    run_dir = tmp_path / "ewc"
    first, second = summary["stages"]
    assert first["artifacts"]["ewc:policy"] == "0-ewc/ewc" and second["metrics"]["ewc_tasks_protected"] == 1
    penalty = load_file(run_dir / "0-ewc" / "ewc" / "penalty-0-sentiment.safetensors")
    adapter = load_file(run_dir / "0-ewc" / "adapters" / "policy" / "adapter_model.safetensors")
    anchors = {k[len("anchor."):]: v for k, v in penalty.items() if k.startswith("anchor.")}
    fisher = {k[len("fisher."):]: v for k, v in penalty.items() if k.startswith("fisher.")}
    assert anchors.keys() == fisher.keys() == adapter.keys()  # the LoRA parameters, under peft's saved names
    assert all(torch.equal(anchors[k], adapter[k]) for k in adapter)  # the anchor is the trained adapter
    assert torch.cat([f.flatten() for f in fisher.values()]).mean().item() == pytest.approx(1.0, abs=1e-4)
    later = sorted(p.name for p in (run_dir / "1-ewc" / "ewc").iterdir())
    assert later == ["penalty-0-sentiment.safetensors", "penalty-1-topic.safetensors"]  # separate: one per task
    logged = [json.loads(x) for x in (run_dir / "1-ewc" / "metrics.jsonl").read_text().splitlines()]
    assert any(x.get("ewc_penalty", 0) > 0 for x in logged)
    assert not any("ewc_penalty" in x for x in (json.loads(y) for y in (run_dir / "0-ewc" / "metrics.jsonl").read_text().splitlines()))


def test_ewc_penalty_keeps_the_adapter_near_its_anchor(toy_dir, tmp_path):
    """The same second task with and without the penalty: EWC moves the important parameters less."""
    from stages.ewc import load_penalties

    def drift(lam: float, name: str) -> float:
        stages = [task("ewc", "sentiment", fisher_samples=16), task("ewc", "topic", ewc_lambda=lam, fisher_samples=16)]
        chain(tmp_path, name, stages).run()
        penalty = load_penalties(tmp_path / name / "0-ewc" / "ewc")[0]
        after = load_file(tmp_path / name / "1-ewc" / "adapters" / "policy" / "adapter_model.safetensors")
        return sum(float((penalty["fisher"][k] * (after[k] - penalty["anchor"][k]) ** 2).sum()) for k in after)

    assert drift(500.0, "strong") < 0.5 * drift(0.0, "free")


def test_ewc_with_progressive_unfreezing_penalises_the_layers_not_yet_unfrozen(toy_dir, tmp_path):
    """`unfreeze_every`: the second task starts with only the top layer trainable; the penalty still covers the whole
    adapter (collected by name, not by requires_grad: that raised KeyError at the second task's first step)."""
    short = {"max_steps": 4, "batch_size": 4, "max_samples": 16, "fisher_samples": 8, "unfreeze_every": 2}
    stages = [task("ewc", "sentiment", **short), task("ewc", "topic", **short)]
    summary = chain(tmp_path, "unfreeze", stages, logging={"log_every": 1}).run()
    assert [s["status"] for s in summary["stages"]] == ["done", "done"]
    penalty = load_file(tmp_path / "unfreeze" / "0-ewc" / "ewc" / "penalty-0-sentiment.safetensors")
    assert any(".layers.0." in k for k in penalty)  # the Fisher covers the lowest layer's LoRA weights too
    logged = [json.loads(x) for x in (tmp_path / "unfreeze" / "1-ewc" / "metrics.jsonl").read_text().splitlines()]
    penalties = [x["ewc_penalty"] for x in logged if "ewc_penalty" in x]
    assert len(penalties) == 4 and penalties[0] == 0.0 and penalties[-1] > 0  # at the anchor first, then pulled


def test_ewc_online_mode_keeps_one_running_penalty_and_dpo_objective(toy_dir, tmp_path):
    stages = [task("ewc", "sentiment", mode="online", gamma=0.5, fisher_samples=8, objective="dpo", max_steps=10),
              task("ewc", "topic", mode="online", gamma=0.5, fisher_samples=8, objective="dpo", max_steps=10)]
    summary = chain(tmp_path, "online", stages).run()
    files = list((tmp_path / "online" / "1-ewc" / "ewc").iterdir())
    assert [f.name for f in files] == ["penalty-0-online.safetensors"]
    assert "reward_accuracy" in summary["stages"][1]["metrics"] or "train_pairs" in summary["stages"][1]["metrics"]
    assert summary["stages"][1]["metrics"]["ewc_tasks_protected"] == 1
    assert summary["continual"]["tasks"] == ["sentiment", "topic"]


def test_fusion_chain_routes_by_the_prompt(toy_dir, tmp_path):
    stages = [task("sft", "sentiment", adapter_name="sentiment", max_steps=120),
              task("sft", "number", adapter_name="number", max_steps=120),
              {"kind": "adapter_fusion", "adapters": ["sentiment", "number"], "samples_per_task": 48, "epochs": 2}]
    summary = chain(tmp_path, "fusion", stages).run()
    block, fused = summary["continual"], summary["stages"][2]
    assert block["trained_at"] == [0, 1] and len(block["acc_matrix"]) == 3
    assert fused["artifacts"] == {"fusion": "2-adapter_fusion/fusion"}
    weights = fused["fusion_weights"]
    assert weights["sentiment"]["sentiment"] > 0.8 and weights["number"]["number"] > 0.8  # routed, from the prompt alone
    own = [block["acc_matrix"][0][0], block["acc_matrix"][1][1]]
    assert block["acc_matrix"][2] == pytest.approx(own, abs=0.05)  # the fused model keeps what each adapter knew
    assert block["bwt"] == pytest.approx(sum(f - o for f, o in zip(block["acc_matrix"][2], own)) / 2, abs=1e-4)


def test_fusion_over_a_single_adapter_reproduces_it(toy_dir):
    from alignment.config import AdapterConfig
    from alignment.fusion import AdapterFusion, FusedModel
    from alignment.policy import SharedPolicy

    policy = SharedPolicy.load("toy")
    policy.add_adapter("solo", AdapterConfig(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a "trained" adapter: B is no longer zero
    batch = policy.tokenizer(["review : the soup was good .", "question : is it"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = policy.model(**batch).logits
        with policy.disabled() as base:
            assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)
    for query, learn_value in (("prompt", False), ("token", False), ("token", True)):
        fusion = AdapterFusion(policy.model, ["solo"], dim=8, learn_value=learn_value, query=query)
        with torch.no_grad():
            fused = FusedModel(fusion)(**batch).logits
        assert torch.allclose(fused, expected, atol=1e-5), query
        assert fusion.mean_weights() == {"solo": 1.0}


def test_multitask_dynamic_weights(toy_dir, tmp_path):
    stage = {"kind": "multitask", "tasks": ["toy:task/sentiment", {"data": "toy:task/number", "weight": 2.0}],
             "weighting": "dynamic", "window": 5, **FAST}
    summary = chain(tmp_path, "mt", [stage]).run()
    block, metrics = summary["continual"], summary["stages"][0]["metrics"]
    assert block["tasks"] == ["sentiment", "number"] and len(block["acc_matrix"]) == 1
    assert block["bwt"] is None and block["forgetting"] is None and block["avg_acc"] is not None
    assert metrics["alpha/sentiment"] + metrics["alpha/number"] == pytest.approx(2.0, abs=1e-3)
    assert metrics["alpha/sentiment"] != 1.0  # dynamic weights moved away from equal
    logged = [json.loads(x) for x in (tmp_path / "mt" / "0-multitask" / "metrics.jsonl").read_text().splitlines()]
    assert any("alpha/0" in x for x in logged)


# ------------------------------------------------------------------------------------------------ validation


def problems(stages: list[dict]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"name": "t", "stages": stages})
    return err.value.problems


def test_validate_catches_chain_mistakes_before_any_model_loads(tmp_path):
    assert problems([{"kind": "sft"}, {"kind": "adapter_fusion", "adapters": ["policy"]}]) == [
        "stages.1.kind: adapter_fusion fuses the adapters of earlier task stages, and there are none; put task "
        "stages (kind sft or ewc, one `adapter_name` per task) before it"
    ]
    text = "\n".join(problems([task("sft", "sentiment", adapter_name="a"), {"kind": "adapter_fusion", "adapters": ["a", "b"]}]))
    assert "stages.1.adapters: 'b' is not trained by an earlier task stage" in text
    assert "stages.1.kind: a 'adapter_fusion' stage needs the `b` artifact" in text
    assert problems([task("sft", "sentiment", replay=0.1)]) == [
        "stages.0.replay: no earlier stage trains a task to replay; drop `replay` on the first task"
    ]
    assert "stages.1.replay: replay mixes earlier tasks' data" in problems([task("sft", "sentiment"), {"kind": "sft", "replay": 0.1}])[0]
    assert "stages.1.mode: stage 0 keeps a 'separate' EWC penalty" in problems(
        [task("ewc", "sentiment"), task("ewc", "topic", mode="online")])[0]
    assert "stages.1.task: task 'sentiment' already names" in problems(
        [task("sft", "sentiment"), task("sft", "topic", task="sentiment")])[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages:\n  - kind: sft\n  - kind: adapter_fusion\n    adapters: [policy]\n")
    proc = run_cli("validate", str(bad))
    assert proc.returncode == 2 and "adapter_fusion fuses the adapters of earlier task stages" in proc.stderr


def test_shipped_continual_configs(toy_dir):
    from alignment.config import load_config

    seq, _ = load_config(REPO / "configs" / "continual_seq.yaml")
    ewc, _ = load_config(REPO / "configs" / "continual_ewc.yaml")
    replay, _ = load_config(REPO / "configs" / "continual_replay.yaml")
    fusion, _ = load_config(REPO / "configs" / "continual_fusion.yaml")
    multitask, _ = load_config(REPO / "configs" / "multitask.yaml")
    tasks = ["sentiment", "topic", "number"]
    for config in (seq, ewc, replay, fusion, multitask):
        assert [t.name for s in config.stages for t in (s.continual_tasks() or [])] == tasks
        assert config.continual.evaluate == "all"
    assert {s.adapter_name for s in seq.stages} == {s.adapter_name for s in ewc.stages} == {"policy"}
    assert [s.adapter_name for s in fusion.stages[:3]] == tasks and fusion.stages[3].adapters == tasks
    assert [s.replay for s in replay.stages] == [0.0, 0.1, 0.1]


def test_task_data_formats_and_held_out_split(tmp_path):
    from alignment.continual import TaskSpec, load_task, preference_rows, sft_rows

    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"text": f"item {i} is", "label": "odd" if i % 2 else "even"}) + "\n" for i in range(20)))
    data = load_task(TaskSpec.from_stage(None, str(labels), None, {}), seed=0)
    assert data.name == "labels" and len(data.eval) == 4 and len(data.train) == 16  # 20 % held out, seeded
    assert {e["prompt"] for e in data.eval}.isdisjoint(e["prompt"] for e in data.train)
    assert data.train[0]["choices"] == data.eval[0]["choices"] and sorted(data.train[0]["choices"]) == [" even", " odd"]
    first = data.train[0]
    assert sft_rows([first]) == [{"prompt": first["prompt"], "completion": first["choices"][first["answer"]]}]
    wrong = [c for c in first["choices"] if c != first["choices"][first["answer"]]]
    assert preference_rows([first]) == [{"prompt": first["prompt"], "chosen": first["choices"][first["answer"]], "rejected": wrong[0]}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": " a", "rejected": " b"}) + "\n" for i in range(10)))
    pair_task = load_task(TaskSpec.from_stage("prefs", str(pairs), None, {}), seed=0)
    assert pair_task.eval[0]["choices"] == [" a", " b"] and pair_task.eval[0]["answer"] == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    from alignment.errors import UserError

    with pytest.raises(UserError, match="is not task data: it needs prompt/completion"):
        load_task(TaskSpec.from_stage(None, str(bad), None, {}), seed=0)


def test_generate_mode_is_exact_match_of_the_greedy_answer(seq_run):
    from alignment.continual import load_task, task_accuracy
    from alignment.evaluation import generate_greedy

    pipeline, _, _ = seq_run
    policy = pipeline.policy()
    examples = load_task(pipeline._chains()[1].spec("sentiment"), 0).eval[:16]
    generated = generate_greedy(policy.model, policy.tokenizer, [e["prompt"] for e in examples], 4)
    right = sum(text.split()[:1] == e["choices"][e["answer"]].split() for e, (text, _) in zip(examples, generated))
    assert task_accuracy(policy.model, policy.tokenizer, examples, method="generate", max_new_tokens=4) == right / 16
