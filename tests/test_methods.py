"""The fine-tuning methods catalogue (alignment/methods.py) on the real toy model: every method trains what it says
and nothing else, reloads to the same logits, has the trainable-parameter count a hand count gives, runs an SFT
stage from the config alone; layer-wise LR decay and progressive unfreezing act through the real trainer; PPO with
full fine-tuning takes the path the matrix names."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import config_from_dict
from alignment.errors import ConfigError, UserError
from alignment.methods import METHODS, OPTION_CLASSES, catalogue, default_options, method_for
from alignment.pipeline import Pipeline
from alignment.policy import SharedPolicy


def toy_dims(toy_dir) -> dict:
    c = json.loads((toy_dir / "model" / "config.json").read_text())
    assert c["tie_word_embeddings"] and not c["attention_bias"] and not c["mlp_bias"]  # what the counts below assume
    return {"H": c["hidden_size"], "I": c["intermediate_size"], "L": c["num_hidden_layers"], "V": c["vocab_size"]}


def hand_count(method: str, H: int, I: int, L: int, V: int) -> int:  # noqa: E741
    """Trainable parameters of each method with its default options, counted from the Llama architecture by hand."""
    r, tokens, hidden = 16, 16, 128  # LoRA rank, virtual tokens, prompt-encoder width (the option defaults)
    lora = L * r * (4 * (H + H) + 2 * (H + I) + (I + H))  # A: r x in, B: out x r on q,k,v,o, gate,up, down
    layer = 4 * H * H + 3 * H * I + 2 * H  # attention, MLP, two RMSNorm gains
    bottleneck = lambda b: H * b + b + b * H + H  # noqa: E731  down and up, with biases
    return {
        "lora": lora, "rslora": lora, "qlora": lora,
        "dora": lora + L * (4 * H + 2 * I + H),  # + a magnitude per output channel
        "ia3": L * (H + H + I),  # k and v outputs, down-projection input
        "prefix": tokens * L * 2 * H,  # a key and a value vector per virtual token and layer
        "prompt": tokens * H,
        "ptuning": tokens * H + (H * hidden + hidden) + (hidden * hidden + hidden) + (hidden * H + H),
        "bottleneck": L * bottleneck(32),  # pfeiffer: after each FFN
        "full": V * H + L * layer + H,  # the head is tied to the embeddings
        "freeze": layer + H,  # top layer + final norm
        "head": V * H,
        "modules": L * 4 * H * H,  # attention
        "bitfit": L * 2 * H + H,  # no biases in Llama: the norm gains
        "mam": tokens * L * 2 * H + L * bottleneck(64),
    }[method]


def lm_batch(policy, n: int = 4):
    from alignment.data import sft_rows

    rows, _ = sft_rows("toy:sft", {}, "data")
    texts = [r["prompt"] + r["completion"] for r in rows[:n]]
    batch = policy.tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch, labels


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_only_its_parameters_and_reloads_to_the_same_logits(name, toy_dir, tmp_path):
    model_path = str(toy_dir / "model")
    method = method_for(default_options(name))
    quantization = method.quantization_config() if name == "qlora" else None
    torch.manual_seed(0)
    policy = SharedPolicy.load(model_path, quantization=quantization)
    model = method.prepare(policy, "policy")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    counted = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert counted == hand_count(name, **toy_dims(toy_dir))

    batch, labels = lm_batch(policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):  # zero-initialised factors (LoRA B, bottleneck up) let the others move from step 2 on
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{name}: trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"{name}: frozen {n} changed"

    model.eval()
    T = batch["input_ids"].shape[1]  # prompt tuning also returns logits at its virtual tokens: compare the real ones
    with torch.no_grad():
        trained_logits = model(**batch).logits[:, -T:]
    method.save(policy, "policy", tmp_path / "saved")
    fresh = SharedPolicy.load(model_path, quantization=quantization)
    reloaded = method.load(fresh, "policy", tmp_path / "saved")
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits[:, -T:], trained_logits, atol=1e-5)
        base_logits = SharedPolicy.load(model_path, quantization=quantization).base(**batch).logits
    assert not torch.allclose(base_logits, trained_logits, atol=1e-3)  # the reload carries the training


def test_qlora_base_is_4bit_nf4_on_cpu(toy_dir):
    import bitsandbytes as bnb

    method = method_for(OPTION_CLASSES["qlora"]())
    policy = SharedPolicy.load(str(toy_dir / "model"), quantization=method.quantization_config())
    q_proj = policy.base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"
    assert q_proj.weight.device.type == "cpu" and q_proj.weight.dtype == torch.uint8


SFT_STAGE = {"kind": "sft", "max_steps": 3, "batch_size": 4, "max_samples": 64, "eval_fraction": 0.0,
             "lr_scheduler": "constant", "warmup_ratio": 0.0, "learning_rate": 1.0e-3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One output folder for this module's runs: they share one run name, so the base model's gold evaluation
    (base_eval.json) is computed once; each test's stages run again because their configs differ."""
    return tmp_path_factory.mktemp("method_runs")


def run_pipeline(tmp_path, adapter: dict, *stages: dict, name: str = "m"):
    raw = {"name": name, "model": "toy", "output_dir": str(tmp_path), "adapter": adapter,
           "logging": {"log_every": 50}, "stages": list(stages)}
    pipeline = Pipeline(config_from_dict(raw)[0])
    return pipeline, pipeline.run(), tmp_path / name


def toy_weights(toy_dir) -> dict[str, torch.Tensor]:
    return load_file(str(toy_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_an_sft_stage_from_the_config_alone(name, toy_dir, runs):
    options = default_options(name).model_dump()
    pipeline, summary, run_dir = run_pipeline(runs, options, SFT_STAGE)
    stage = summary["stages"][0]
    assert stage["status"] == "done" and "gold_reward" in stage["metrics"]
    method = method_for(default_options(name))
    policy = pipeline.policy()
    original = toy_weights(toy_dir)
    if method.family == "base":  # a plain model folder: the selected weights moved, every other one is the toy's
        saved = load_file(str(run_dir / stage["artifacts"]["policy"] / "model.safetensors"))
        selected = set(method.selected(policy.base))
        assert selected
        for n, tensor in original.items():
            assert torch.equal(saved[n], tensor) != (n in selected), n
    else:  # an adapter (or our modules) next to the shared base, which stays the toy's, bit for bit
        assert (run_dir / stage["artifacts"]["policy"] / ("bottleneck.safetensors" if name == "bottleneck"
                                                          else "adapter_config.json")).exists()
    if name != "qlora":  # base-weight and module methods hand the shared base back unchanged after the stage
        state = policy.base.state_dict()
        assert all(torch.equal(state[n], t) for n, t in original.items() if n in state)
        assert not any("_adapter." in n for n in state)


def test_layerwise_lr_decay_through_the_trainer(toy_dir, runs):
    """One AdamW step moves each element by about the group's learning rate (sign of the gradient, bias-corrected):
    the largest change per tensor reads the learning rate back. L = 4: layer i trains at lr * 0.5 ** (4 - i),
    the (tied) embeddings at lr * 0.5 ** 5, the final norm at lr."""
    stage = {**SFT_STAGE, "max_steps": 1, "layer_lr_decay": 0.5}
    _, summary, run_dir = run_pipeline(runs, {"method": "full"}, stage)
    saved = load_file(str(run_dir / summary["stages"][0]["artifacts"]["policy"] / "model.safetensors"))
    original = toy_weights(toy_dir)
    step = {n: (saved[n] - t).abs().max().item() for n, t in original.items()}
    lr = 1.0e-3
    for i in range(4):
        assert step[f"model.layers.{i}.self_attn.q_proj.weight"] == pytest.approx(lr * 0.5 ** (4 - i), rel=0.02)
        assert step[f"model.layers.{i}.mlp.down_proj.weight"] == pytest.approx(lr * 0.5 ** (4 - i), rel=0.02)
    assert step["model.embed_tokens.weight"] == pytest.approx(lr * 0.5**5, rel=0.02)
    assert step["model.norm.weight"] == pytest.approx(lr, rel=0.02)


def test_layerwise_lr_groups_by_hand(toy_dir):
    from alignment.schedules import parameter_groups

    policy = SharedPolicy.load(str(toy_dir / "model"))
    method_for(default_options("full")).prepare(policy, "policy")
    groups = parameter_groups(policy.base, 1e-3, 0.1, 0.8)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["model.layers.2.mlp.up_proj.weight"]["lr"] == pytest.approx(1e-3 * 0.8**2)
    assert by_name["model.layers.2.mlp.up_proj.weight"]["weight_decay"] == 0.1
    assert by_name["model.layers.2.input_layernorm.weight"]["weight_decay"] == 0.0  # vectors are not decayed
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["lr"] == pytest.approx(1e-3 * 0.8**4)
    assert by_name["model.norm.weight"]["lr"] == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(policy.base.parameters()))


def test_progressive_unfreezing_on_schedule(toy_dir, runs):
    """Full fine-tuning, one more group every 2 steps, 3 steps: steps 0-1 train the top group (final norm), step 2
    adds layer 3; layers 0-2 and the (tied) embeddings stay the toy's, bit for bit."""
    stage = {**SFT_STAGE, "unfreeze_every": 2}
    _, summary, run_dir = run_pipeline(runs, {"method": "full"}, stage)
    saved = load_file(str(run_dir / summary["stages"][0]["artifacts"]["policy"] / "model.safetensors"))
    for n, tensor in toy_weights(toy_dir).items():
        moved = not torch.equal(saved[n], tensor)
        assert moved == (n == "model.norm.weight" or n.startswith("model.layers.3.")), n


def test_bad_method_options_are_rejected_before_any_model_loads():
    def problems(adapter, *kinds):
        with pytest.raises(ConfigError) as e:
            config_from_dict({"name": "x", "adapter": adapter, "stages": [{"kind": k} for k in kinds or ["sft"]]})
        return e.value.problems

    assert problems({"method": "prefix", "num_virtual_token": 4}) == [
        "adapter.num_virtual_token: unknown key; did you mean `num_virtual_tokens`?"]
    assert problems({"method": "freeze"})[0].startswith("adapter: Value error, set exactly one of `train_top`")
    assert "unknown `method`" in problems({"method": "loha"})[0]
    assert problems({"method": "bottleneck", "placement": "middle"})[0].startswith("adapter.placement:")
    with pytest.raises(ConfigError) as e:
        config_from_dict({"name": "x", "adapter": {"method": "mam"},
                          "stages": [{"kind": "sft"}, {"kind": "adapter_fusion", "adapters": ["policy"]}]})
    assert e.value.problems[-1] == (
        "adapter.method: a 'adapter_fusion' stage does not support method 'mam' (it supports: sft, reward, dpo, kto, "
        "orpo, ppo, grpo, rloo, ewc, multitask); override `adapter:` for this stage, e.g. `adapter: {method: lora}` "
        "(see `alignment methods`)")
    with pytest.raises(ConfigError) as e:
        config_from_dict({"name": "x", "adapter": {"method": "full"},
                          "stages": [{"kind": "ewc", "data": "toy:task/sentiment", "objective": "dpo"}]})
    assert e.value.problems == [
        "adapter.method: an `ewc` stage with `objective: dpo` trains a LoRA-family adapter only (TRL's in-model `ref` "
        "copy of it is the reference), not 'full'; use `objective: sft` or a LoRA-family method (lora, rslora, dora, "
        "qlora)"]
    raw = {"name": "x", "adapter": {"method": "lora", "r": 4}, "stages": [{"kind": "sft"}]}
    config, warnings = config_from_dict(raw, ["adapter.method=prompt"])
    assert config.adapter.method == "prompt" and "dropped options it does not have: r" in warnings[0]


def test_methods_command_prints_the_matrix(toy_dir, capsys):
    from alignment.app.cli import main

    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    rows = {r["method"]: r for r in catalogue(str(toy_dir / "model"))}
    for row in rows.values():
        r = row
        assert f"| {r['method']} | {r['trainable']:,} | {r['percent']:.2f} | {r['stages']} | {r['rollout']} |" in printed
    assert rows["full"]["percent"] == 100.0 and rows["full"]["rollout"] == "HF engine only"  # tied embeddings
    assert rows["freeze"]["rollout"] == rows["dora"]["rollout"] == "full-weight reload into vLLM"
    assert rows["prefix"]["rollout"] == "HF engine only" and rows["lora"]["rollout"] == "LoRA hot-swap in vLLM"
    assert "+6.3 MiB" in rows["full"]["memory"]  # two fp32 copies of 829,312 parameters
    assert all(rows[m]["trainable"] == hand_count(m, **toy_dims(toy_dir)) for m in METHODS)


@pytest.mark.parametrize(("adapter", "engine", "sync"), [
    ({"method": "full"}, "hf", "shared"),  # trains the toy's tied embeddings: the matrix names the HF engine
    ({"method": "freeze", "train_top": 1}, "vllm", "merged"),  # full-weight reloads into vLLM
])
def test_ppo_with_a_base_weight_method_takes_the_path_the_matrix_names(adapter, engine, sync, toy_dir, runs):
    """SFT -> PPO (toy gold reward) with a method that trains base weights: the engine and sync the matrix names,
    engine log-probs equal to the trainer's (the reload is exact), a reference that is a frozen copy of the SFT
    policy (KL 0 before the first update), PPO moved the policy, and the shared base stayed the toy's."""
    ppo = {"kind": "ppo", "reward": "toy_gold", "iterations": 2, "batch_size": 8, "minibatch_size": 8, "ppo_epochs": 1,
           "max_new_tokens": 8, "learning_rate": 1.0e-4, "gold_eval_every": 100, "sync_check_every": 1,
           "checkpoint_every": 100, "reward_normalization": "running"}
    pipeline, summary, run_dir = run_pipeline(runs, adapter, SFT_STAGE, ppo)
    method = method_for(OPTION_CLASSES[adapter["method"]](**adapter))
    assert method.rollout_for(pipeline.policy().base)[0] == {"hf": "hf", "vllm": "merged"}[engine]  # the matrix's path
    sft, stage = summary["stages"]
    assert stage["engine"] == engine and stage["sync_mode"] == sync
    assert stage["metrics"]["sync_logprob_diff_max"] < 1e-3
    first = json.loads((run_dir / "1-ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    sft_weights = load_file(str(run_dir / sft["artifacts"]["policy"] / "model.safetensors"))
    ppo_weights = load_file(str(run_dir / stage["artifacts"]["policy"] / "model.safetensors"))
    selected = set(method.selected(pipeline.policy().base))
    assert {n for n, t in sft_weights.items() if not torch.equal(ppo_weights[n], t)} == selected - {"lm_head.weight"}
    state = pipeline.policy().base.state_dict()
    assert all(torch.equal(state[n], t) for n, t in toy_weights(toy_dir).items())


# ------------------------------------------------------------------------ methods beyond SFT: offline, group, reward

def changed_names(before: dict, after: dict) -> set[str]:
    return {n for n, t in before.items() if not torch.equal(after[n], t)}


def artifact_weights(run_dir, stage: dict, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / stage["artifacts"]["policy"] / file))


def assert_shared_base_is_the_toys(pipeline, toy_dir):
    state = {n.replace(".base_layer", ""): t for n, t in pipeline.policy().base.state_dict().items()}  # under LoRA
    assert all(torch.equal(state[n], t) for n, t in toy_weights(toy_dir).items())
    assert not any("_adapter." in n for n in state)


OFFLINE = {"max_steps": 2, "batch_size": 4, "max_samples": 32, "eval_fraction": 0.0, "lr_scheduler": "constant",
           "warmup_ratio": 0.0, "learning_rate": 1.0e-3}


@pytest.mark.parametrize(("kind", "adapter"), [
    ("dpo", {"method": "freeze", "train_top": 1}),
    ("dpo", {"method": "full"}),
    ("kto", {"method": "head"}),
    ("orpo", {"method": "modules", "train": ["mlp"]}),
])
def test_offline_preference_stage_with_a_base_weight_method(kind, adapter, toy_dir, runs):
    """SFT -> DPO/KTO/ORPO with a method that trains base weights: exactly the selected weights moved from the SFT
    policy's (the tied lm_head is not saved), the reference is the SFT policy bit for bit, the shared base stays
    the toy's."""
    pipeline, summary, run_dir = run_pipeline(runs, adapter, SFT_STAGE, {"kind": kind, **OFFLINE})
    sft, stage = summary["stages"]
    assert stage["status"] == "done" and stage["artifacts"]["policy"].endswith("model")
    method = method_for(OPTION_CLASSES[adapter["method"]](**adapter))
    selected = set(method.selected(pipeline.policy().base)) - {"lm_head.weight"}
    assert changed_names(artifact_weights(run_dir, sft), artifact_weights(run_dir, stage)) == selected
    if kind != "orpo":
        assert stage["metrics"]["reference_max_abs_diff"] == 0.0
    assert "gold_reward" in stage["metrics"]
    assert_shared_base_is_the_toys(pipeline, toy_dir)


@pytest.mark.parametrize("kind", ["dpo", "kto", "orpo"])
def test_offline_preference_stage_with_bottleneck_modules(kind, toy_dir, runs):
    """SFT -> DPO/KTO/ORPO with bottleneck adapters: every bottleneck tensor moved from its SFT value, the reference
    (a separate copy with the SFT modules; ORPO has none) is the SFT policy bit for bit, the shared base stays the
    toy's."""
    adapter = {"method": "bottleneck", "size": 8}
    pipeline, summary, run_dir = run_pipeline(runs, adapter, SFT_STAGE, {"kind": kind, **OFFLINE})
    sft, stage = summary["stages"]
    before = artifact_weights(run_dir, sft, "bottleneck.safetensors")
    after = artifact_weights(run_dir, stage, "bottleneck.safetensors")
    assert set(before) == set(after) and changed_names(before, after) == set(before)
    if kind != "orpo":
        assert stage["metrics"]["reference_max_abs_diff"] == 0.0
    assert_shared_base_is_the_toys(pipeline, toy_dir)


GROUP = {"reward": "toy_gold", "iterations": 2, "batch_size": 2, "group_size": 2, "minibatch_size": 4,
         "ppo_epochs": 1, "max_new_tokens": 8, "learning_rate": 1.0e-4, "gold_eval_every": 100,
         "checkpoint_every": 100}


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_stage_with_a_base_weight_method(kind, toy_dir, runs):
    """SFT -> GRPO/RLOO with layer freezing: the policy trains on its own copy (the top layer and final norm moved,
    nothing else), the reference is a frozen copy (KL 0 before the first update), the shared base stays the toy's."""
    adapter = {"method": "freeze", "train_top": 1}
    pipeline, summary, run_dir = run_pipeline(runs, adapter, SFT_STAGE, {"kind": kind, **GROUP})
    sft, stage = summary["stages"]
    method = method_for(OPTION_CLASSES["freeze"](**adapter))
    assert changed_names(artifact_weights(run_dir, sft), artifact_weights(run_dir, stage)) == \
        set(method.selected(pipeline.policy().base))
    first = json.loads((run_dir / f"1-{kind}" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert_shared_base_is_the_toys(pipeline, toy_dir)


REWARD = {"kind": "reward", "max_steps": 2, "batch_size": 4, "max_samples": 32, "learning_rate": 1.0e-3}
PROMPTS = ["review of the soup in paris :", "review of the bike in oslo :"]
ANSWERS = [" the soup was good and fresh .", " the bike was bad ."]


@pytest.mark.parametrize("name", ["rslora", "dora", "qlora"])
def test_reward_stage_with_a_lora_typed_method(name, toy_dir, runs):
    """The reward stage trains an rsLoRA / DoRA / QLoRA `reward` adapter (every B factor moved off zero, the shared
    base is the toy's, or 4-bit for QLoRA); our loader scores exactly as stock transformers + peft read the saved
    folder (not for QLoRA: stock loads the base unquantised)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from reward_models import TrainedRewardModel

    pipeline, summary, run_dir = run_pipeline(runs, {"method": name, "r": 4}, REWARD)
    folder = run_dir / summary["stages"][0]["artifacts"]["reward_model"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)
    assert (name == "dora") == any("magnitude" in k for k in saved)
    if name == "qlora":
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
        return
    assert_shared_base_is_the_toys(pipeline, toy_dir)
    ours = TrainedRewardModel.load(folder, policy=SharedPolicy.load(str(toy_dir / "model"))).score(PROMPTS, ANSWERS)
    stock = AutoModelForSequenceClassification.from_pretrained(toy_dir / "model", num_labels=1)
    stock = PeftModel.from_pretrained(stock, folder).eval()
    tok = pipeline.policy().tokenizer
    with torch.no_grad():
        for p, c, s in zip(PROMPTS, ANSWERS, ours):
            assert stock(**tok([p + c], return_tensors="pt")).logits[0, 0].item() == pytest.approx(s.item(), abs=1e-4)


def test_reward_stage_with_a_base_weight_method_then_ppo(toy_dir, runs):
    """SFT (LoRA) -> reward (layer freezing: its own copy of the base) -> PPO with that reward model: the reward
    folder's selected weights moved from the toy's and no other did; PPO holds it as a separate frozen model and
    scores as a fresh load does; the shared base stays the toy's."""
    from reward_models import TrainedRewardModel

    adapter = {"method": "freeze", "train_top": 1}
    ppo = {"kind": "ppo", "reward": "trained", "iterations": 1, "batch_size": 4, "minibatch_size": 4,
           "ppo_epochs": 1, "max_new_tokens": 8, "gold_eval_every": 100, "checkpoint_every": 100,
           "rollout": {"engine": "hf"}}
    pipeline, summary, run_dir = run_pipeline(runs, {"method": "lora", "r": 4}, SFT_STAGE,
                                              {**REWARD, "adapter": adapter}, ppo)
    assert [s["status"] for s in summary["stages"]] == ["done"] * 3
    folder = run_dir / summary["stages"][1]["artifacts"]["reward_model"]
    method = method_for(OPTION_CLASSES["freeze"](**adapter))
    selected = set(method.selected(SharedPolicy.load(str(toy_dir / "model")).base))  # the shared one carries LoRA
    assert changed_names(toy_weights(toy_dir), load_file(str(folder / "model.safetensors"))) == selected
    standalone = TrainedRewardModel.load(folder).score(PROMPTS, ANSWERS)
    on_policy = TrainedRewardModel.load(folder, policy=pipeline.policy()).score(PROMPTS, ANSWERS)
    assert torch.equal(standalone, on_policy)
    assert_shared_base_is_the_toys(pipeline, toy_dir)


TASK = {"max_steps": 3, "batch_size": 4, "max_samples": 32, "learning_rate": 1.0e-3}


@pytest.mark.parametrize(("kind", "adapter"), [
    ("ewc", {"method": "freeze", "train_top": 1}),
    ("ewc", {"method": "rslora", "r": 4}),
    ("multitask", {"method": "freeze", "train_top": 1}),
    ("multitask", {"method": "dora", "r": 4}),
    ("ewc", {"method": "bottleneck", "size": 8}),
    ("multitask", {"method": "bottleneck", "size": 8}),
])
def test_continual_stage_with_a_method(kind, adapter, toy_dir, runs):
    """EWC (two tasks: the second under the first's penalty) and multi-task stages with layer freezing, a LoRA-family
    method or bottleneck modules: exactly the method's parameters moved (from the toy, or from the first task's),
    the shared base stays the toy's (and carries no modules after the stage)."""
    if kind == "ewc":
        stages = [{"kind": "ewc", "data": "toy:task/sentiment", **TASK}, {"kind": "ewc", "data": "toy:task/topic", **TASK}]
    else:
        stages = [{"kind": "multitask", "tasks": ["toy:task/sentiment", "toy:task/number"], **TASK}]
    pipeline, summary, run_dir = run_pipeline(runs, adapter, *stages, name=f"c-{kind}")
    assert [s["status"] for s in summary["stages"]] == ["done"] * len(stages)
    last = summary["stages"][-1]
    if kind == "ewc":
        assert last["metrics"]["ewc_tasks_protected"] == 1
    base, modules = adapter["method"] == "freeze", adapter["method"] == "bottleneck"
    file = "model.safetensors" if base else "bottleneck.safetensors" if modules else "adapter_model.safetensors"
    after = artifact_weights(run_dir, last, file)
    if base:
        before = toy_weights(toy_dir) if kind == "multitask" else artifact_weights(run_dir, summary["stages"][0], file)
        selected = set(method_for(OPTION_CLASSES["freeze"](**adapter)).selected(pipeline.policy().base))
        assert changed_names(before, after) == selected
    elif kind == "ewc":  # every adapter tensor moved from the first task's
        before = artifact_weights(run_dir, summary["stages"][0], file)
        assert changed_names(before, after) == set(before)
    elif modules:  # fresh bottlenecks: every up projection (zero at insertion) moved
        assert all(t.abs().max() > 0 for k, t in after.items() if ".up." in k)
    else:  # a fresh DoRA adapter: every B factor left zero, and the magnitudes are there
        assert all(t.abs().max() > 0 for k, t in after.items() if "lora_B" in k)
        assert any("magnitude" in k for k in after)
    assert_shared_base_is_the_toys(pipeline, toy_dir)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", ["dpo", "kto", "orpo"])
def test_offline_preference_stage_continues_prefix_tuning(kind, projection, toy_dir, runs):
    """peft refuses to load a saved prompt-learning adapter as trainable; the saved prefixes in a fresh trainable
    adapter are the same adapter, so DPO/KTO/ORPO continue prefix tuning: the prefixes moved from the SFT ones,
    TRL's `ref` copy is the SFT adapter bit for bit (no reference in ORPO), the shared base stays the toy's. With
    `projection` the encoder (saved beside peft's computed prefixes) continues: every encoder tensor moved, and the
    reference holds the SFT encoder bit for bit."""
    adapter = {"method": "prefix", "num_virtual_tokens": 4, "projection": projection}
    pipeline, summary, run_dir = run_pipeline(runs, adapter, SFT_STAGE, {"kind": kind, **OFFLINE},
                                              name=f"prefix-{kind}-{projection}")
    sft, stage = summary["stages"]
    before = artifact_weights(run_dir, sft, "adapter_model.safetensors")
    after = artifact_weights(run_dir, stage, "adapter_model.safetensors")
    assert set(before) == {"prompt_embeddings"} and changed_names(before, after) == {"prompt_embeddings"}
    if projection:
        before = artifact_weights(run_dir, sft, "prompt_encoder.safetensors")
        after = artifact_weights(run_dir, stage, "prompt_encoder.safetensors")
        assert before and changed_names(before, after) == set(before)
    if kind != "orpo":
        assert stage["metrics"]["reference_max_abs_diff"] == 0.0
    assert_shared_base_is_the_toys(pipeline, toy_dir)


@pytest.mark.parametrize("kind,method", [("dpo", "prompt"), ("kto", "ptuning")])
def test_offline_preference_stage_continues_prompt_tuning(kind, method, toy_dir, runs):
    """Prompt tuning and P-tuning prepend virtual tokens to the logits; TRL's DPO and KTO trainers read the real
    tokens' positions, so they continue these adapters too: the virtual tokens (P-tuning: every tensor of its
    encoder) moved from the SFT ones, TRL's `ref` copy is the SFT adapter bit for bit, the base stays the toy's."""
    pipeline, summary, run_dir = run_pipeline(runs, {"method": method, "num_virtual_tokens": 4}, SFT_STAGE,
                                              {"kind": kind, **OFFLINE}, name=f"{method}-{kind}")
    sft, stage = summary["stages"]
    file = "prompt_encoder.safetensors" if method == "ptuning" else "adapter_model.safetensors"
    before, after = artifact_weights(run_dir, sft, file), artifact_weights(run_dir, stage, file)
    assert before and changed_names(before, after) == set(before)
    assert stage["metrics"]["reference_max_abs_diff"] == 0.0
    assert_shared_base_is_the_toys(pipeline, toy_dir)


def test_prompt_learning_that_cannot_continue_is_refused(toy_dir, tmp_path):
    """P-tuning (and prefix tuning with a projection) are saved by peft as computed virtual tokens, without their
    encoder: our folders carry the encoder too (prompt_encoder.safetensors) and continue from it exactly; a folder
    without it is refused."""
    for projection in (False, True):
        config_from_dict({"name": "x", "adapter": {"method": "prefix", "projection": projection},
                          "stages": [{"kind": "sft"}, {"kind": "dpo"}]})
    policy = SharedPolicy.load(str(toy_dir / "model"))
    method_for(default_options("ptuning")).prepare(policy, "policy")
    policy.save_adapter("policy", tmp_path / "pt")
    again = SharedPolicy.load(str(toy_dir / "model"))
    again.load_adapter("policy", tmp_path / "pt", trainable=True)
    trained = policy.model.prompt_encoder["policy"].state_dict()
    loaded = again.model.prompt_encoder["policy"].state_dict()
    assert set(trained) == set(loaded) and all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert again.adapter_parameters("policy") and all(p.requires_grad for p in again.adapter_parameters("policy"))
    (tmp_path / "pt" / "prompt_encoder.safetensors").unlink()  # as peft alone saves it
    with pytest.raises(UserError, match="computed virtual tokens"):
        SharedPolicy.load(str(toy_dir / "model")).load_adapter("policy", tmp_path / "pt", trainable=True)


def assert_layer_rates(before: dict, after: dict, lr: float):
    """One AdamW step moves each element by at most its group's learning rate (as in the SFT test above)."""
    step = {n: (after[n] - t).abs().max().item() for n, t in before.items()}
    for i in range(4):
        assert step[f"model.layers.{i}.self_attn.q_proj.weight"] == pytest.approx(lr * 0.5 ** (4 - i), rel=0.02)
        assert step[f"model.layers.{i}.mlp.down_proj.weight"] == pytest.approx(lr * 0.5 ** (4 - i), rel=0.02)
    assert step["model.embed_tokens.weight"] == pytest.approx(lr * 0.5**5, rel=0.02)
    assert step["model.norm.weight"] == pytest.approx(lr, rel=0.02)


TOP_GROUP_THEN_LAYER_3 = lambda n: n == "model.norm.weight" or n.startswith("model.layers.3.")  # noqa: E731


@pytest.mark.parametrize("schedule", [{"max_steps": 1, "layer_lr_decay": 0.5}, {"max_steps": 3, "unfreeze_every": 2}])
def test_schedules_in_dpo(schedule, toy_dir, runs):
    """SFT -> DPO with full fine-tuning: layer-wise LR decay (one step: the per-layer learning rates read back) and
    progressive unfreezing (steps 0-1 the final norm, step 2 adds layer 3; the rest stays the SFT policy's)."""
    pipeline, summary, run_dir = run_pipeline(runs, {"method": "full"}, SFT_STAGE, {"kind": "dpo", **OFFLINE, **schedule})
    sft, stage = summary["stages"]
    before, after = artifact_weights(run_dir, sft), artifact_weights(run_dir, stage)
    if "layer_lr_decay" in schedule:
        assert_layer_rates(before, after, OFFLINE["learning_rate"])
    else:
        assert changed_names(before, after) == {n for n in before if TOP_GROUP_THEN_LAYER_3(n)}


@pytest.mark.parametrize("schedule", [{"max_steps": 1, "layer_lr_decay": 0.5}, {"max_steps": 3, "unfreeze_every": 2}])
def test_schedules_in_the_reward_stage(schedule, toy_dir, runs):
    """The reward stage's own loop with full fine-tuning (its own copy of the base): the same per-layer rates, and
    the same unfreezing order (the score head trains from the start with the top group)."""
    stage = {**REWARD, "lr_scheduler": "constant", "warmup_ratio": 0.0, **schedule}
    _, summary, run_dir = run_pipeline(runs, {"method": "full"}, stage)
    folder = run_dir / summary["stages"][0]["artifacts"]["reward_model"]
    before, after = toy_weights(toy_dir), load_file(str(folder / "model.safetensors"))
    if "layer_lr_decay" in schedule:
        assert_layer_rates(before, after, REWARD["learning_rate"])
    else:
        assert changed_names(before, after) == {n for n in before if TOP_GROUP_THEN_LAYER_3(n)}


@pytest.mark.parametrize("name", ["bottleneck", "mam"])
def test_export_and_generate_with_module_methods(name, toy_dir, runs, tmp_path):
    """A bottleneck / MAM policy: `export --out` copies its folder, `--merge` is refused (nonlinear modules cannot
    be folded into linear weights), `generate` samples greedily what the loaded policy generates."""
    from alignment.evaluation import generate_greedy
    from alignment.export import Generator, export

    options = {**default_options(name).model_dump(), "size": 8}
    pipeline, summary, run_dir = run_pipeline(runs, options, SFT_STAGE, name=f"x-{name}")
    folder = run_dir / summary["stages"][0]["artifacts"]["policy"]
    assert (export(run_dir, tmp_path / "out", merge=False) / "bottleneck.safetensors").is_file()
    with pytest.raises(UserError, match="cannot be merged"):
        export(run_dir, tmp_path / "merged", merge=True)
    generator = Generator(str(run_dir))
    texts = generator(PROMPTS, max_new_tokens=8)
    policy = SharedPolicy.load(str(toy_dir / "model"))
    model = method_for(OPTION_CLASSES[name](**options)).load(policy, "policy", folder)
    model.eval()
    expected = [t for t, _ in generate_greedy(model, policy.tokenizer, PROMPTS, 8)]
    assert [t.strip() for t in texts] == [t.strip() for t in expected]


@pytest.mark.parametrize("kind", ["dpo", "kto", "orpo"])
def test_ia3_continues_in_offline_preference_stages(kind, toy_dir, runs):
    """SFT -> DPO / KTO / ORPO with IA3: every IA3 scaling vector moved from its SFT value, the shared base stays the
    toy's, and the reference (TRL's `ref` copy, which TRL alone leaves at IA3's initial scalings) is the SFT adapter
    bit for bit."""
    pipeline, summary, run_dir = run_pipeline(runs, {"method": "ia3"}, SFT_STAGE, {"kind": kind, **OFFLINE})
    sft, stage = summary["stages"]
    before = artifact_weights(run_dir, sft, "adapter_model.safetensors")
    after = artifact_weights(run_dir, stage, "adapter_model.safetensors")
    assert before and all("ia3_l" in k for k in before) and changed_names(before, after) == set(before)
    if kind != "orpo":
        assert stage["metrics"]["reference_max_abs_diff"] == 0.0
    assert_shared_base_is_the_toys(pipeline, toy_dir)


def test_schedules_in_online_stages(toy_dir, runs):
    """PPO with full fine-tuning (its own copy of the base) and layer-wise LR decay: one optimiser step reads the
    per-layer learning rates back; GRPO with progressive unfreezing every iteration: iteration 1 trains the top
    group (final norm), iteration 2 adds layer 3, nothing else moved from the SFT policy."""
    ppo = {"kind": "ppo", "reward": "toy_gold", "iterations": 1, "batch_size": 8, "minibatch_size": 8,
           "ppo_epochs": 1, "max_new_tokens": 8, "learning_rate": 1.0e-4, "gold_eval_every": 100,
           "checkpoint_every": 100, "target_kl": None, "layer_lr_decay": 0.5}
    _, summary, run_dir = run_pipeline(runs, {"method": "full"}, SFT_STAGE, ppo, name="o-ppo")
    sft, stage = summary["stages"]
    assert_layer_rates(artifact_weights(run_dir, sft), artifact_weights(run_dir, stage), 1.0e-4)
    grpo = {"kind": "grpo", **GROUP, "batch_size": 4, "minibatch_size": 8, "unfreeze_every": 1}
    _, summary, run_dir = run_pipeline(runs, {"method": "full"}, SFT_STAGE, grpo, name="o-grpo")
    sft, stage = summary["stages"]
    before, after = artifact_weights(run_dir, sft), artifact_weights(run_dir, stage)
    assert changed_names(before, after) == {n for n in before if TOP_GROUP_THEN_LAYER_3(n)}


def test_progressive_unfreezing_of_a_lora_adapter_in_dpo(toy_dir, runs):
    """DPO on a LoRA adapter, one more group every 2 steps, 3 steps: steps 0-1 train layer 3's LoRA factors (the top
    group that has any), step 2 adds layer 2's; layers 0-1 stay the SFT adapter's bit for bit, although TRL's switch
    to its `ref` adapter re-enables `requires_grad` on the whole trained adapter every step."""
    stage = {"kind": "dpo", **OFFLINE, "max_steps": 3, "unfreeze_every": 2}
    _, summary, run_dir = run_pipeline(runs, {"method": "lora", "r": 4}, SFT_STAGE, stage, name="u-lora")
    sft, dpo = summary["stages"]
    before = artifact_weights(run_dir, sft, "adapter_model.safetensors")
    after = artifact_weights(run_dir, dpo, "adapter_model.safetensors")
    assert changed_names(before, after) == {k for k in before if ".layers.3." in k or ".layers.2." in k}


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_orpo_continues_prompt_tuning_on_the_real_tokens(method, toy_dir, runs):
    """TRL's ORPO loss compares every logit position with the labels; prompt tuning and P-tuning prepend virtual
    tokens to the logits, which our ORPO stage drops in one forward hook (stages/orpo.py ``real_token_trainer``), so
    ORPO continues them: the virtual tokens (P-tuning: every tensor of its encoder) moved from the SFT ones, the loss
    is finite, the base stays the toy's (ORPO has no reference)."""
    pipeline, summary, run_dir = run_pipeline(runs, {"method": method, "num_virtual_tokens": 4}, SFT_STAGE,
                                              {"kind": "orpo", **OFFLINE}, name=f"{method}-orpo")
    sft, stage = summary["stages"]
    assert stage["status"] == "done" and math.isfinite(stage["metrics"]["train_loss"])
    file = "prompt_encoder.safetensors" if method == "ptuning" else "adapter_model.safetensors"
    before, after = artifact_weights(run_dir, sft, file), artifact_weights(run_dir, stage, file)
    assert before and changed_names(before, after) == set(before)
    assert_shared_base_is_the_toys(pipeline, toy_dir)
