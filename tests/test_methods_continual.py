"""Fine-tuning methods in continual stages: IA3, QLoRA, prefix / prompt tuning, P-tuning and MAM in EWC chains and
multi-task stages (tests/test_methods.py covers the LoRA family, base-weight methods and bottleneck modules there).

Each run is a few steps on two toy tasks. EWC chains assert that the second task continued the first one's saved
adapter exactly (the logged penalty is 0 at its first step) and then trained under that penalty, that the penalty's
anchor is the first task's saved adapter bit for bit over exactly its parameters, and that every one of them moved
in the second task; every run asserts that the reported task accuracy is what the saved
adapter, loaded onto a fresh base, scores, and that the shared base is the toy's afterwards (and carries no modules).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import config_from_dict
from alignment.continual import TaskSpec, completion_scores, load_task
from alignment.errors import ConfigError
from alignment.methods import OPTION_CLASSES, method_for
from alignment.pipeline import Pipeline
from alignment.policy import SharedPolicy

TASK = {"max_steps": 3, "batch_size": 4, "max_samples": 16, "learning_rate": 1.0e-2, "lr_scheduler": "constant",
        "warmup_ratio": 0.0}
EWC = {**TASK, "fisher_samples": 8}
CONTINUAL = {"eval_samples": 20}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("continual_method_runs")


def run_chain(tmp_path, adapter: dict, kind: str, **fields):
    """Two EWC stages (sentiment, then topic) or one multi-task stage (sentiment and number), `fields` added."""
    if kind == "ewc":
        stages = [{"kind": "ewc", "data": f"toy:task/{t}", **EWC, **fields} for t in ("sentiment", "topic")]
    else:
        stages = [{"kind": "multitask", "tasks": ["toy:task/sentiment", "toy:task/number"], **TASK, **fields}]
    name = "-".join([adapter["method"], *["projection"] * adapter.get("projection", False), kind, *fields.values()])
    raw = {"name": name, "model": "toy",
           "output_dir": str(tmp_path), "adapter": adapter, "continual": CONTINUAL, "logging": {"log_every": 1},
           "stages": stages}
    pipeline = Pipeline(config_from_dict(raw)[0])
    summary = pipeline.run()
    return pipeline, summary, tmp_path / name


def saved_weights(run_dir, stage: dict) -> dict[str, torch.Tensor]:
    """The policy artifact's trained tensors: the peft adapter file, plus MAM's bottleneck modules; for P-tuning and
    prefix tuning with a projection the prompt encoder (peft's file holds only the virtual tokens it computed)."""
    folder = run_dir / stage["artifacts"]["policy"]
    out = load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "bottleneck.safetensors").exists():
        out.update(load_file(str(folder / "bottleneck.safetensors")))
    if (folder / "prompt_encoder.safetensors").exists():
        del out["prompt_embeddings"]
        out.update({f"prompt_encoder.{k}": t for k, t in load_file(str(folder / "prompt_encoder.safetensors")).items()})
    return out


def saved_name(name: str, saved: dict) -> str:
    """A penalty key as the artifact names it: peft saves a prompt encoder's table as `prompt_embeddings`, and MAM's
    modules under the base's own names (the penalty sees them through the prompt-learning PeftModel)."""
    if name in saved:
        return name
    return "prompt_embeddings" if name == "prompt_encoder.embedding.weight" else name.removeprefix("base_model.")


def assert_accuracy_reloads(pipeline, summary, run_dir, adapter: dict, toy_dir, quantization=None):
    """The last stage's reported task accuracy is what its saved policy scores on a fresh base (the evaluation with
    the adapter active, and the save / load round trip)."""
    last = summary["stages"][-1]
    policy = SharedPolicy.load(str(toy_dir / "model"), quantization=quantization)
    method = method_for(OPTION_CLASSES[adapter["method"]](**adapter))
    model = method.load(policy, "policy", run_dir / last["artifacts"]["policy"])
    assert pipeline._chains()[last["index"]].evaluate(model, policy.tokenizer) == last["task_accuracy"]


def assert_shared_base_is_the_toys(pipeline, toy_dir):
    state = {n.replace(".base_layer", ""): t for n, t in pipeline.policy().base.state_dict().items()}
    assert all(torch.equal(state[n], t) for n, t in load_file(str(toy_dir / "model" / "model.safetensors")).items())
    assert not any("_adapter." in n for n in state)


def assert_ewc_chain(summary, run_dir) -> tuple[dict, dict]:
    """The second task continued the first one's saved adapter exactly (its penalty is 0 at the first step) and
    trained under that penalty, anchored at the first task's saved adapter (exactly its parameters, bit for bit);
    every one of those parameters moved. Returns both stages' saved weights."""
    first, second = summary["stages"]
    assert first["metrics"]["ewc_tasks_protected"] == 0 and second["metrics"]["ewc_tasks_protected"] == 1
    logged = [json.loads(line) for line in (run_dir / second["dir"] / "metrics.jsonl").read_text().splitlines()]
    penalties = [r["ewc_penalty"] for r in logged if "ewc_penalty" in r]
    assert penalties[0] == 0.0 and all(p > 0.0 for p in penalties[1:])  # theta leaves the anchor after step 1
    before, after = saved_weights(run_dir, first), saved_weights(run_dir, second)
    penalty = load_file(str(run_dir / first["artifacts"]["ewc:policy"] / "penalty-0-sentiment.safetensors"))
    anchor = {saved_name(k.removeprefix("anchor."), before): t for k, t in penalty.items() if k.startswith("anchor.")}
    fisher = {saved_name(k.removeprefix("fisher."), before) for k in penalty if k.startswith("fisher.")}
    assert set(anchor) == fisher == set(before)
    assert all(torch.equal(anchor[n], before[n]) for n in before)
    assert {n for n in before if not torch.equal(before[n], after[n])} == set(before)
    return before, after


PEFT_CASES = [
    ("ewc", {"method": "ia3"}),
    ("multitask", {"method": "ia3"}),
    ("ewc", {"method": "prefix", "num_virtual_tokens": 4}),
    ("multitask", {"method": "prefix", "num_virtual_tokens": 4}),
    ("ewc", {"method": "prompt", "num_virtual_tokens": 4}),
    ("multitask", {"method": "prompt", "num_virtual_tokens": 4}),
    ("ewc", {"method": "ptuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    ("multitask", {"method": "ptuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    ("ewc", {"method": "prefix", "num_virtual_tokens": 4, "projection": True, "encoder_hidden_size": 16}),
    ("ewc", {"method": "mam", "num_virtual_tokens": 4, "size": 8}),
    ("multitask", {"method": "mam", "num_virtual_tokens": 4, "size": 8}),
]


@pytest.mark.parametrize(("kind", "adapter"), PEFT_CASES,
                         ids=[f"{k}-{a['method']}" + "-projection" * a.get("projection", False) for k, a in PEFT_CASES])
def test_continual_stage_with_a_peft_or_mam_method(kind, adapter, toy_dir, runs):
    """IA3, prefix tuning (also with a projection), prompt tuning, P-tuning and MAM in an EWC chain or a multi-task
    stage: exactly the method's parameters trained (EWC: all of them moved from the first task's, under its
    penalty), the task accuracy is the saved adapter's, and the shared base is the toy's afterwards."""
    pipeline, summary, run_dir = run_chain(runs, adapter, kind)
    assert [s["status"] for s in summary["stages"]] == ["done"] * len(summary["stages"])
    if kind == "ewc":
        before, after = assert_ewc_chain(summary, run_dir)
    else:
        after = saved_weights(run_dir, summary["stages"][0])
    expected = {"ia3": {"ia3_l"}, "prefix": {"prompt_embeddings"}, "prompt": {"prompt_embeddings"},
                "ptuning": {"prompt_encoder."}, "mam": {"prompt_embeddings", "mlp_adapter"}}[adapter["method"]]
    if adapter.get("projection"):
        expected = {"prompt_encoder."}
    assert {next(e for e in expected if e in k) for k in after} == expected  # nothing but the method's tensors
    if adapter["method"] == "ia3":  # IA3 starts at ones: every scaling vector moved
        assert all(not torch.equal(t, torch.ones_like(t)) for t in after.values())
    if adapter["method"] == "mam":  # the parallel bottlenecks' up projections start at zero: all moved
        assert all(t.abs().max() > 0 for k, t in after.items() if ".up." in k)
    assert_accuracy_reloads(pipeline, summary, run_dir, adapter, toy_dir)
    assert_shared_base_is_the_toys(pipeline, toy_dir)


QLORA_CASES = [("ewc", "sft"), ("ewc", "dpo"), ("multitask", None)]


@pytest.mark.parametrize(("kind", "objective"), QLORA_CASES, ids=["ewc", "ewc-dpo", "multitask"])
def test_continual_stage_with_qlora(kind, objective, toy_dir, runs):
    """QLoRA in an EWC chain (SFT and DPO objectives) and a multi-task stage: the shared base stays in 4-bit NF4,
    bit-identical to a fresh 4-bit load of the toy; the EWC penalty covers exactly the LoRA factors (all moved in the
    second task); a fresh adapter's B factors all left zero; the task accuracy is the saved adapter's."""
    import bitsandbytes as bnb

    adapter = {"method": "qlora", "r": 4}
    pipeline, summary, run_dir = run_chain(runs, adapter, kind, **({"objective": objective} if objective else {}))
    assert [s["status"] for s in summary["stages"]] == ["done"] * len(summary["stages"])
    if kind == "ewc":
        before, after = assert_ewc_chain(summary, run_dir)
        assert set(before) and all("lora_A" in k or "lora_B" in k for k in before)
    else:
        after = saved_weights(run_dir, summary["stages"][0])
        assert all(t.abs().max() > 0 for k, t in after.items() if "lora_B" in k)
    quantization = method_for(OPTION_CLASSES["qlora"](**adapter)).quantization_config()
    base = pipeline.policy().base
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"
    fresh = SharedPolicy.load(str(toy_dir / "model"), quantization=quantization).base.state_dict()
    state = {n.replace(".base_layer", ""): t for n, t in base.state_dict().items() if "lora_" not in n}
    assert set(state) == set(fresh) and all(torch.equal(state[n], t) for n, t in fresh.items())
    assert_accuracy_reloads(pipeline, summary, run_dir, adapter, toy_dir, quantization)


def test_prompt_tuning_is_scored_on_the_real_tokens(toy_dir):
    """Prompt tuning returns logits for its virtual tokens too (first); the task evaluator scores the completion's real
    tokens: the same sum of log-probs as peft's own loss, which knows where the virtual tokens are."""
    from alignment.methods import PromptOptions

    policy = SharedPolicy.load(str(toy_dir / "model"))
    model = method_for(PromptOptions(num_virtual_tokens=4)).prepare(policy, "policy").eval()
    tok = policy.tokenizer
    examples = load_task(TaskSpec.from_stage(None, "toy:task/number", None, {}), 0).eval[:3]
    prompts = [e["prompt"] for e in examples]
    completions = [e["choices"][(e["answer"] + i) % len(e["choices"])] for i, e in enumerate(examples)]
    scores = completion_scores(model, tok, prompts, completions)
    expected = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            ids = torch.tensor([tok(prompt + completion).input_ids])
            start = len(tok(prompt).input_ids)
            labels = ids.clone()
            labels[:, :start] = -100
            out = model(input_ids=ids, labels=labels)
            assert out.logits.shape[1] == ids.shape[1] + 4  # the virtual tokens' positions come first
            expected.append(-out.loss.item() * (ids.shape[1] - start))
    assert scores == pytest.approx(expected, abs=1e-4)


def test_continual_stages_accept_and_refuse_methods(toy_dir):
    """`alignment validate` accepts the methods above in ewc / multitask, and still refuses what is not supported."""
    def problems(adapter, *stages):
        try:
            config_from_dict({"name": "x", "adapter": adapter, "stages": list(stages)})
        except ConfigError as e:
            return e.problems
        return []

    ewc = [{"kind": "ewc", "data": "toy:task/sentiment"}, {"kind": "ewc", "data": "toy:task/topic"}]
    multitask = {"kind": "multitask", "tasks": ["toy:task/sentiment", "toy:task/number"]}
    for method in ("ia3", "qlora", "prefix", "prompt", "ptuning", "mam"):
        assert problems({"method": method}, *ewc) == problems({"method": method}, multitask) == []
    assert problems({"method": "prefix", "projection": True}, *ewc) == []
    assert problems({"method": "ptuning"}, {"kind": "sft"}, {"kind": "orpo"}) == []
    assert problems({"method": "ia3"}, {**ewc[0], "objective": "dpo"})[0].startswith(
        "adapter.method: an `ewc` stage with `objective: dpo` trains a LoRA-family adapter only")


def test_ewc_chain_with_an_adapter_per_task(toy_dir, runs):
    """P-tuning with one adapter per task (sentiment, topic) and a third task continuing the first adapter: each
    adapter has its own penalty (topic's stage protects nothing), the continued one starts exactly where it was saved
    (penalty 0 at its first step) although another prompt encoder sits on the model, and the other adapter is not
    touched (its virtual tokens are still the saved ones)."""
    adapter = {"method": "ptuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}
    stages = [{"kind": "ewc", "data": f"toy:task/{task}", "adapter_name": name, **EWC}
              for task, name in (("sentiment", "sentiment"), ("topic", "topic"), ("number", "sentiment"))]
    raw = {"name": "ptuning-per-task", "model": "toy", "output_dir": str(runs), "adapter": adapter,
           "continual": CONTINUAL, "logging": {"log_every": 1}, "stages": stages}
    pipeline = Pipeline(config_from_dict(raw)[0])
    summary = pipeline.run()
    run_dir = runs / raw["name"]
    assert [s["metrics"]["ewc_tasks_protected"] for s in summary["stages"]] == [0, 0, 1]
    assert set(summary["stages"][2]["artifacts"]) == {"sentiment", "ewc:sentiment"}
    logged = [json.loads(line) for line in (run_dir / "2-ewc" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ewc_penalty"] for r in logged if "ewc_penalty" in r][0] == 0.0
    policy = pipeline.policy()
    assert sorted(policy.adapters) == ["sentiment", "topic"]
    topic = load_file(str(run_dir / summary["stages"][1]["artifacts"]["topic"] / "adapter_model.safetensors"))
    assert torch.equal(policy.adapter_state("topic")["prompt_embeddings"], topic["prompt_embeddings"])
    assert_shared_base_is_the_toys(pipeline, toy_dir)
