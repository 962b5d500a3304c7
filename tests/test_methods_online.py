"""Methods that train on a copy of the base of their own in the reward and online stages (alignment/methods.py
``FrozenBasePolicy``), on the real toy model: bottleneck modules, IA3, prompt learning (prefix, prompt, P-tuning)
and MAM in PPO / GRPO / RLOO train only the method's parameters of the policy's own copy of the base, the reference
is the SFT policy (KL 0 before the first update), the saved policy reloads to the same logits, a killed PPO resumes
to an uninterrupted run's end; a bottleneck, IA3, prompt-learning or MAM reward model trains on a copy of its own
and PPO holds it as a separate frozen model (MAM in DPO / KTO / ORPO too). ``held`` keeps the policy the stage built
(the real ``online_policy``) so its copy can be inspected after the stage."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import alignment.methods
import reward_models.trained
from alignment.methods import BOTTLENECK_FILE, BottleneckMethod, BottleneckOptions, insert_bottlenecks
from alignment.policy import SharedPolicy
from tests.test_methods import (
    ANSWERS,
    PROMPTS,
    SFT_STAGE,
    assert_shared_base_is_the_toys,
    changed_names,
    run_pipeline,
    toy_weights,
)

BOTTLENECK = {"method": "bottleneck", "size": 8}
PREFIX = {"method": "prefix", "num_virtual_tokens": 4}
PPO = {"kind": "ppo", "reward": "toy_gold", "iterations": 2, "batch_size": 4, "minibatch_size": 4, "ppo_epochs": 1,
       "max_new_tokens": 8, "learning_rate": 1.0e-3, "gold_eval_every": 100, "sync_check_every": 1,
       "checkpoint_every": 1, "reward_normalization": "running"}
GROUP = {"reward": "toy_gold", "iterations": 2, "batch_size": 2, "group_size": 2, "minibatch_size": 4,
         "ppo_epochs": 1, "max_new_tokens": 8, "learning_rate": 1.0e-3, "gold_eval_every": 100,
         "checkpoint_every": 1}
REWARD = {"kind": "reward", "max_steps": 2, "batch_size": 4, "max_samples": 32, "learning_rate": 1.0e-3}
PPO_ON_REWARD = {**PPO, "reward": "trained", "iterations": 1, "reward_normalization": "fixed",  # the trained model
                 "rollout": {"engine": "hf"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("online_method_runs")


@pytest.fixture
def held(monkeypatch):
    """The policy an online stage builds (the real ``online_policy``, its result kept for the asserts)."""
    kept = []
    real = alignment.methods.online_policy

    def keep(ctx):
        kept.append(real(ctx))
        return kept[-1]

    monkeypatch.setattr(alignment.methods, "online_policy", keep)
    return kept


def first_metrics(run_dir, stage: str) -> dict:
    return json.loads((run_dir / stage / "metrics.jsonl").read_text().splitlines()[0])


def modules_of(run_dir, stage: dict, artifact: str = "policy") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / stage["artifacts"][artifact] / BOTTLENECK_FILE))


def assert_base_is_the_toys(model, toy_dir) -> None:
    """Every base parameter of ``model`` (a copy with modules) is the toy's, bit for bit."""
    state = {n: t for n, t in model.state_dict().items() if "_adapter." not in n}
    toy = toy_weights(toy_dir)
    assert set(toy) <= set(state)
    assert all(torch.equal(state[n], t) for n, t in toy.items())


def test_deep_copy_of_a_model_with_bottlenecks_has_its_own_modules(toy_dir):
    """The online reference is ``copy.deepcopy`` of the policy: its hooks must call its own modules, so changing the
    policy's modules leaves the copy's outputs as they were (a closure hook would still call the original's)."""
    model = SharedPolicy.load(str(toy_dir / "model")).base
    insert_bottlenecks(model, 8, "houlsby", "relu", 1.0)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        before = model(ids).logits
        reference = copy.deepcopy(model)
        for name, param in model.named_parameters():
            if "_adapter.up" in name:
                param.add_(0.1)
        assert not torch.equal(model(ids).logits, before)
        assert torch.equal(reference(ids).logits, before)


def test_ppo_with_bottleneck_modules(toy_dir, runs, held):
    """SFT -> PPO with bottleneck modules: the HF engine; KL 0 before the first update (the reference is the SFT
    policy); exactly the modules of the policy's own copy moved, every base parameter of that copy and of the shared
    base is the toy's bit for bit; the saved policy (the SFT format) reloads to the trained policy's logits, and
    `alignment generate` on the run samples greedily what the trained policy does."""
    pipeline, summary, run_dir = run_pipeline(runs, BOTTLENECK, SFT_STAGE, PPO, name="b-ppo")
    sft, stage = summary["stages"]
    assert stage["engine"] == "hf" and stage["metrics"]["sync_logprob_diff_max"] < 1e-4
    assert first_metrics(run_dir, "1-ppo")["kl"] == pytest.approx(0.0, abs=1e-6)
    before, after = modules_of(run_dir, sft), modules_of(run_dir, stage)
    assert set(before) == set(after) and all("_adapter." in n for n in after)
    assert changed_names(before, after) == set(before)
    (policy,) = held
    trained = policy.policy_model
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == set(before)
    assert_base_is_the_toys(trained, toy_dir)
    assert_shared_base_is_the_toys(pipeline, toy_dir)
    reloaded = SharedPolicy.load(str(toy_dir / "model"))
    folder = run_dir / stage["artifacts"]["policy"]
    model = BottleneckMethod(BottleneckOptions(**BOTTLENECK)).load(reloaded, "policy", folder)
    batch = reloaded.tokenizer([p + a for p, a in zip(PROMPTS, ANSWERS)], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, trained(**batch).logits)
    from alignment.evaluation import generate_greedy
    from alignment.export import Generator

    expected = [t.strip() for t, _ in generate_greedy(trained.eval(), reloaded.tokenizer, PROMPTS, 8)]
    assert [t.strip() for t in Generator(str(run_dir))(PROMPTS, max_new_tokens=8)] == expected  # `alignment generate`


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_stage_with_bottleneck_modules(kind, toy_dir, runs, held):
    """SFT -> GRPO / RLOO with bottleneck modules (checkpointed every iteration): the modules moved, KL 0 before the
    first update, the policy copy's base and the shared base stay the toy's."""
    pipeline, summary, run_dir = run_pipeline(runs, BOTTLENECK, SFT_STAGE, {"kind": kind, **GROUP}, name=f"b-{kind}")
    sft, stage = summary["stages"]
    assert stage["engine"] == "hf"
    assert changed_names(modules_of(run_dir, sft), modules_of(run_dir, stage)) == set(modules_of(run_dir, sft))
    assert first_metrics(run_dir, f"1-{kind}")["kl"] == pytest.approx(0.0, abs=1e-6)
    assert_base_is_the_toys(held[0].policy_model, toy_dir)
    assert_shared_base_is_the_toys(pipeline, toy_dir)


def test_reward_stage_with_bottleneck_modules_then_ppo(toy_dir, runs, monkeypatch):
    """SFT (LoRA) -> reward (bottleneck modules on its own copy of the base) -> PPO with that reward model: every
    module's up projection moved off its zero start, the copy's base is the toy's bit for bit, the saved folder holds
    only the modules and the head, and it scores as the trained model did (loaded alone and beside the pipeline's
    policy); PPO runs with it; the shared base stays the toy's."""
    from reward_models import TrainedRewardModel
    from reward_models.trained import sequence_rewards

    trained = keep_reward_training(monkeypatch)
    pipeline, summary, run_dir = run_pipeline(runs, {"method": "lora", "r": 4}, SFT_STAGE,
                                              {**REWARD, "adapter": BOTTLENECK}, PPO_ON_REWARD, name="b-reward")
    assert [s["status"] for s in summary["stages"]] == ["done"] * 3
    folder = run_dir / summary["stages"][1]["artifacts"]["reward_model"]
    saved = load_file(str(folder / BOTTLENECK_FILE))
    assert saved and all("_adapter." in n for n in saved) and not (folder / "model.safetensors").exists()
    assert all(t.abs().max() > 0 for n, t in saved.items() if ".up." in n)
    (scorer, head, _), = trained
    assert_base_is_the_toys(scorer.base, toy_dir)
    with torch.no_grad():
        expected = sequence_rewards(scorer, None, head, [p + a for p, a in zip(PROMPTS, ANSWERS)], 512)
    standalone = TrainedRewardModel.load(folder).score(PROMPTS, ANSWERS)
    on_policy = TrainedRewardModel.load(folder, policy=pipeline.policy()).score(PROMPTS, ANSWERS)
    assert torch.equal(standalone, expected) and torch.equal(on_policy, expected)
    assert_shared_base_is_the_toys(pipeline, toy_dir)


def test_validate_accepts_the_stages_the_matrix_names_and_refuses_the_rest():
    """Bottleneck, IA3, MAM and prompt learning (prefix with and without `projection`, prompt, P-tuning) in the
    reward and online stages, MAM in DPO/KTO/ORPO too; AdapterFusion, which fuses LoRA adapters, still refuses the
    others in one line (tests/test_methods.py)."""
    from alignment.config import config_from_dict

    def stages(kind):
        return [{"kind": "sft"}, {"kind": kind, "reward": "toy_gold"} if kind != "reward" else {"kind": "reward"}]

    prompt_learning = [{**PREFIX, "projection": False}, {**PREFIX, "projection": True}, {"method": "prompt"},
                       {"method": "ptuning"}]
    for kind in ("reward", "ppo", "grpo", "rloo"):
        for adapter in [BOTTLENECK, {"method": "ia3"}, {"method": "mam"}, *prompt_learning]:
            config_from_dict({"name": "x", "adapter": adapter, "stages": stages(kind)})
    for kind in ("dpo", "kto", "orpo"):
        config_from_dict({"name": "x", "adapter": {"method": "mam"}, "stages": [{"kind": "sft"}, {"kind": kind}]})


def test_ppo_with_ia3_on_a_copy_of_its_own(toy_dir, runs, held):
    """SFT -> PPO with IA3 (which peft cannot hold beside the LoRA value adapter): the policy is the SFT adapter on a
    copy of the base of its own, the full-weight reload into vLLM (merged on a throwaway copy) matches the trainer's
    log-probs, KL 0 before the first update, exactly the IA3 scalings moved, the copy's base and the shared base stay
    the toy's, and the saved adapter reloads to the trained policy's logits."""
    pipeline, summary, run_dir = run_pipeline(runs, {"method": "ia3"}, SFT_STAGE, PPO, name="ia3-ppo")
    sft, stage = summary["stages"]
    assert stage["engine"] == "vllm" and stage["sync_mode"] == "merged"
    assert stage["metrics"]["sync_logprob_diff_max"] < 1e-3
    assert first_metrics(run_dir, "1-ppo")["kl"] == pytest.approx(0.0, abs=1e-6)
    file = "adapter_model.safetensors"
    before, after = (load_file(str(run_dir / s["artifacts"]["policy"] / file)) for s in (sft, stage))
    assert set(before) == set(after) and all("ia3_" in n for n in after)
    assert changed_names(before, after) == set(before)
    (policy,) = held
    trained = policy.policy_model
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): t
            for n, t in trained.state_dict().items() if "ia3_" not in n}
    assert all(torch.equal(base[n], t) for n, t in toy_weights(toy_dir).items())
    assert_shared_base_is_the_toys(pipeline, toy_dir)
    reloaded = SharedPolicy.load(str(toy_dir / "model"))
    reloaded.load_adapter("policy", run_dir / stage["artifacts"]["policy"])
    batch = reloaded.tokenizer([p + a for p, a in zip(PROMPTS, ANSWERS)], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(reloaded.model(**batch).logits, trained(**batch).logits)


def test_group_stage_with_ia3_on_a_copy_of_its_own(toy_dir, runs, held):
    """SFT -> RLOO with IA3 (HF engine): the IA3 scalings moved, KL 0 before the first update, the copy's base and
    the shared base stay the toy's."""
    stage_cfg = {"kind": "rloo", **GROUP, "rollout": {"engine": "hf"}}
    pipeline, summary, run_dir = run_pipeline(runs, {"method": "ia3"}, SFT_STAGE, stage_cfg, name="ia3-rloo")
    sft, stage = summary["stages"]
    assert stage["engine"] == "hf"
    file = "adapter_model.safetensors"
    before, after = (load_file(str(run_dir / s["artifacts"]["policy"] / file)) for s in (sft, stage))
    assert set(before) == set(after) and changed_names(before, after) == set(before)
    assert first_metrics(run_dir, "1-rloo")["kl"] == pytest.approx(0.0, abs=1e-6)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): t
            for n, t in held[0].policy_model.state_dict().items() if "ia3_" not in n}
    assert all(torch.equal(base[n], t) for n, t in toy_weights(toy_dir).items())
    assert_shared_base_is_the_toys(pipeline, toy_dir)


PROMPT_LEARNING_FILES = ("adapter_model.safetensors", "prompt_encoder.safetensors")


def prompt_learning_weights(run_dir, stage: dict) -> dict[str, torch.Tensor]:
    """What a prompt-learning policy folder holds: the virtual tokens peft saves, and the prompt encoder our save
    writes beside them (P-tuning, prefix tuning with `projection`)."""
    folder = run_dir / stage["artifacts"]["policy"]
    return {f"{f}:{n}": t for f in PROMPT_LEARNING_FILES if (folder / f).exists()
            for n, t in load_file(str(folder / f)).items()}


@pytest.mark.parametrize("projection", [False, True])
def test_ppo_with_prefix_tuning_on_a_copy_of_its_own(projection, toy_dir, runs, held):
    """SFT -> PPO with prefix tuning (with and without the `projection` MLP): the HF engine's log-probs are the
    trainer's, KL 0 before the first update, exactly the prefix parameters of the policy's own copy moved (the
    virtual tokens, or the encoder that computes them), the copy's base and the shared base are the toy's bit for
    bit, and the saved policy (the SFT format) reloads to the trained policy's logits and `alignment generate` on the
    run samples greedily what the trained policy does."""
    adapter = {**PREFIX, "projection": projection}
    pipeline, summary, run_dir = run_pipeline(runs, adapter, SFT_STAGE, PPO, name=f"prefix-ppo-{projection}")
    sft, stage = summary["stages"]
    assert stage["engine"] == "hf" and stage["metrics"]["sync_logprob_diff_max"] < 1e-4
    assert first_metrics(run_dir, "1-ppo")["kl"] == pytest.approx(0.0, abs=1e-6)
    before, after = prompt_learning_weights(run_dir, sft), prompt_learning_weights(run_dir, stage)
    assert set(before) == set(after) and changed_names(before, after) == set(before)
    assert any(n.startswith("prompt_encoder.safetensors:") for n in before) == projection
    (policy,) = held
    trained = policy.policy_model
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.policy.") for n in trainable)
    assert_base_is_the_toys(policy.own.base, toy_dir)
    assert_shared_base_is_the_toys(pipeline, toy_dir)
    reloaded = SharedPolicy.load(str(toy_dir / "model"))
    reloaded.load_adapter("policy", run_dir / stage["artifacts"]["policy"])
    batch = reloaded.tokenizer([p + a for p, a in zip(PROMPTS, ANSWERS)], return_tensors="pt", padding=True)
    with torch.no_grad():
        got, want = reloaded.model(**batch).logits, trained.eval()(**batch).logits
    if projection:  # peft saves the prefixes the MLP computed (one row); training computes them per batch: rounding
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    else:
        assert torch.equal(got, want)
    from alignment.evaluation import generate_greedy
    from alignment.export import Generator

    expected = [t.strip() for t, _ in generate_greedy(trained, reloaded.tokenizer, PROMPTS, 8)]
    assert [t.strip() for t in Generator(str(run_dir))(PROMPTS, max_new_tokens=8)] == expected  # `alignment generate`


@pytest.mark.parametrize(("kind", "method"), [("grpo", "prompt"), ("rloo", "ptuning")])
def test_group_stage_with_virtual_tokens_on_a_copy_of_its_own(kind, method, toy_dir, runs, held):
    """SFT -> GRPO with prompt tuning / RLOO with P-tuning, whose virtual tokens lengthen the logits the policy
    returns: the trainer reads the real tokens' log-probs (the HF engine's equal them), KL 0 before the first update,
    the virtual tokens (or their encoder) moved, the copy's base and the shared base stay the toy's."""
    adapter = {"method": method, "num_virtual_tokens": 4}
    stage_cfg = {"kind": kind, **GROUP, "sync_check_every": 1}
    pipeline, summary, run_dir = run_pipeline(runs, adapter, SFT_STAGE, stage_cfg, name=f"{method}-{kind}")
    sft, stage = summary["stages"]
    assert stage["engine"] == "hf" and stage["metrics"]["sync_logprob_diff_max"] < 1e-4
    assert first_metrics(run_dir, f"1-{kind}")["kl"] == pytest.approx(0.0, abs=1e-6)
    before, after = prompt_learning_weights(run_dir, sft), prompt_learning_weights(run_dir, stage)
    assert set(before) == set(after) and changed_names(before, after) == set(before)
    assert_base_is_the_toys(held[0].own.base, toy_dir)
    assert_shared_base_is_the_toys(pipeline, toy_dir)


def test_ppo_shared_critic_with_prompt_tuning_reads_the_real_tokens_hidden_states(toy_dir, runs, held):
    """PPO with `critic: shared` and prompt tuning: the value head reads the hidden states at the real tokens'
    positions (the virtual tokens' dropped as for the logits), so the stage runs, KL is 0 before the first update and
    the engine's log-probs are the trainer's."""
    adapter = {"method": "prompt", "num_virtual_tokens": 4}
    stage_cfg = {**PPO, "iterations": 1, "critic": "shared"}
    pipeline, summary, run_dir = run_pipeline(runs, adapter, SFT_STAGE, stage_cfg, name="prompt-ppo-shared")
    stage = summary["stages"][1]
    assert stage["status"] == "done" and stage["metrics"]["sync_logprob_diff_max"] < 1e-4
    assert first_metrics(run_dir, "1-ppo")["kl"] == pytest.approx(0.0, abs=1e-6)
    assert_shared_base_is_the_toys(pipeline, toy_dir)


def test_reward_stage_with_ia3_on_a_copy_of_its_own_then_ppo(toy_dir, runs, monkeypatch):
    """SFT (LoRA) -> reward (IA3, which peft cannot hold beside the LoRA policy, on its own copy of the base) -> PPO
    with that reward model: every IA3 scaling moved off its start of ones, the copy's base is the toy's bit for bit,
    the saved folder holds the stock peft IA3 adapter and the head (no model weights), and it scores as the trained
    model did (loaded alone and beside the pipeline's policy); one PPO iteration runs with it as a separate frozen
    model; the shared base stays the toy's."""
    from reward_models import TrainedRewardModel
    from reward_models.trained import PEFT_FOLDER, sequence_rewards

    trained = keep_reward_training(monkeypatch)
    pipeline, summary, run_dir = run_pipeline(runs, {"method": "lora", "r": 4}, SFT_STAGE,
                                              {**REWARD, "adapter": {"method": "ia3"}}, PPO_ON_REWARD,
                                              name="ia3-reward")
    assert [s["status"] for s in summary["stages"]] == ["done"] * 3
    folder = run_dir / summary["stages"][1]["artifacts"]["reward_model"]
    saved = load_file(str(folder / PEFT_FOLDER / "adapter_model.safetensors"))
    assert saved and all("ia3_" in n for n in saved) and not list(folder.glob("*.safetensors"))
    assert json.loads((folder / PEFT_FOLDER / "adapter_config.json").read_text())["peft_type"] == "IA3"
    assert all(not torch.equal(t, torch.ones_like(t)) for t in saved.values())
    (scorer, head, _), = trained
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): t
            for n, t in scorer.model.state_dict().items() if "ia3_" not in n}
    assert all(torch.equal(base[n], t) for n, t in toy_weights(toy_dir).items())
    with torch.no_grad():
        expected = sequence_rewards(scorer, None, head, [p + a for p, a in zip(PROMPTS, ANSWERS)], 512)
    standalone = TrainedRewardModel.load(folder).score(PROMPTS, ANSWERS)
    on_policy = TrainedRewardModel.load(folder, policy=pipeline.policy()).score(PROMPTS, ANSWERS)
    assert torch.equal(standalone, expected) and torch.equal(on_policy, expected)
    assert first_metrics(run_dir, "2-ppo")["step"] == 1
    assert_shared_base_is_the_toys(pipeline, toy_dir)


def keep_reward_training(monkeypatch):
    """[(scorer, head, parameters at the start)]: the reward model the reward stage trained (the real ``_scorer``
    and ``save_base_reward_model``, their results kept for the asserts)."""
    import stages.reward

    kept, start = [], []
    real_scorer, real_save = stages.reward.RewardStage._scorer, reward_models.trained.save_base_reward_model

    def scorer(self, ctx):
        made = real_scorer(self, ctx)
        start.append({n: p.detach().clone() for n, p in made[0].model.named_parameters()})
        return made

    def save(policy, head, folder, stats, options):
        kept.append((policy, head, start[-1]))
        return real_save(policy, head, folder, stats, options)

    monkeypatch.setattr(stages.reward.RewardStage, "_scorer", scorer)
    monkeypatch.setattr(reward_models.trained, "save_base_reward_model", save)
    return kept


def test_reward_stage_with_prefix_tuning_on_a_copy_of_its_own_then_ppo(toy_dir, runs, monkeypatch):
    """SFT (LoRA) -> reward (prefix tuning, which peft cannot hold beside the LoRA policy, on its own copy of the base,
    not checkpointed) -> PPO with that reward model: exactly the prefixes moved, the copy's base is the toy's bit for
    bit, the saved folder holds the stock peft prefix adapter and the head, and it scores exactly as the trained model
    did (loaded alone and beside the pipeline's policy); one PPO iteration runs with it as a separate frozen model;
    the shared base stays the toy's."""
    from reward_models import TrainedRewardModel
    from reward_models.trained import PEFT_FOLDER, sequence_rewards

    trained = keep_reward_training(monkeypatch)
    pipeline, summary, run_dir = run_pipeline(runs, {"method": "lora", "r": 4}, SFT_STAGE,
                                              {**REWARD, "adapter": PREFIX}, PPO_ON_REWARD, name="prefix-reward")
    assert [s["status"] for s in summary["stages"]] == ["done"] * 3
    folder = run_dir / summary["stages"][1]["artifacts"]["reward_model"]
    assert json.loads((folder / PEFT_FOLDER / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    assert not list(folder.glob("*.safetensors"))
    (scorer, head, start), = trained
    after = {n: p.detach() for n, p in scorer.model.named_parameters()}
    assert changed_names(start, after) == {"prompt_encoder.reward.embedding.weight"}
    assert_base_is_the_toys(scorer.base, toy_dir)
    texts = [p + a for p, a in zip(PROMPTS, ANSWERS)]
    with torch.no_grad():
        expected = sequence_rewards(scorer, None, head, texts, 512)
        with scorer.model.disable_adapter():  # the prefixes change the score: they reach the layers
            bare = sequence_rewards(scorer, None, head, texts, 512)
    assert not torch.equal(bare, expected)
    standalone = TrainedRewardModel.load(folder).score(PROMPTS, ANSWERS)
    on_policy = TrainedRewardModel.load(folder, policy=pipeline.policy()).score(PROMPTS, ANSWERS)
    assert torch.equal(standalone, expected) and torch.equal(on_policy, expected)
    assert first_metrics(run_dir, "2-ppo")["step"] == 1
    assert_shared_base_is_the_toys(pipeline, toy_dir)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_reward_stage_with_virtual_tokens_scores_the_last_real_token(method, toy_dir, runs, monkeypatch):
    """Reward with prompt tuning / P-tuning on a copy of its own: the virtual tokens come first in the hidden
    states, and the score is read at the last real token (equal to the head on peft's own forward, by hand); only
    the virtual tokens (or their encoder) moved, the copy's base is the toy's, and the saved folder scores as the
    trained model did (P-tuning is saved as the virtual tokens its encoder computed: equal up to rounding)."""
    from reward_models import TrainedRewardModel
    from reward_models.trained import sequence_rewards

    trained = keep_reward_training(monkeypatch)
    adapter = {"method": method, "num_virtual_tokens": 4}
    pipeline, summary, run_dir = run_pipeline(runs, adapter, {**REWARD, "gradient_checkpointing": True},
                                              name=f"{method}-reward")
    folder = run_dir / summary["stages"][0]["artifacts"]["reward_model"]
    (scorer, head, start), = trained
    after = {n: p.detach() for n, p in scorer.model.named_parameters()}
    moved = changed_names(start, after)
    assert moved and all(n.startswith("prompt_encoder.reward.") for n in moved)
    assert moved == {n for n, p in scorer.model.named_parameters() if p.requires_grad}
    assert_base_is_the_toys(scorer.base, toy_dir)
    texts = [p + a for p, a in zip(PROMPTS, ANSWERS)]
    tokenizer = scorer.tokenizer
    with torch.no_grad():
        expected = sequence_rewards(scorer, None, head, texts, 512)
        by_hand = []
        for text in texts:  # one at a time, no padding: the last position of peft's output is the last real token
            ids = tokenizer(text, return_tensors="pt")
            out = scorer.model(**ids, output_hidden_states=True, use_cache=False)
            assert out.logits.shape[1] == ids["input_ids"].shape[1] + 4
            by_hand.append(head(out.hidden_states[-1][0, -1]).float())
    torch.testing.assert_close(expected, torch.cat(by_hand), rtol=0, atol=1e-5)
    got = TrainedRewardModel.load(folder).score(PROMPTS, ANSWERS)
    if method == "prompt":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


MAM = {"method": "mam", "num_virtual_tokens": 4, "size": 8}



def mam_weights(run_dir, stage: dict, artifact: str = "policy") -> dict[str, torch.Tensor]:
    """What a MAM folder holds: the prefixes peft saves and our parallel bottleneck modules."""
    folder = run_dir / stage["artifacts"][artifact]
    return {f"{f}:{n}": t for f in ("adapter_model.safetensors", BOTTLENECK_FILE)
            for n, t in load_file(str(folder / f)).items()}



def test_ppo_with_mam_on_a_copy_of_its_own(toy_dir, runs, held):
    """SFT -> PPO with MAM (peft prefix tuning + our parallel bottleneck modules): the SFT artifact on a copy of the
    base of its own (not checkpointed, as prefix tuning's), the HF engine's log-probs are the trainer's, KL 0 before
    the first update, exactly the prefixes and the modules moved (the only trainable parameters of the copy), the
    copy's base and the shared base are the toy's bit for bit, and the saved policy (the SFT format) reloads to the
    trained policy's logits and `alignment generate` on the run samples greedily what the trained policy does."""
    from alignment.methods import MamMethod, MamOptions

    pipeline, summary, run_dir = run_pipeline(runs, MAM, SFT_STAGE, PPO, name="mam-ppo")
    sft, stage = summary["stages"]
    assert stage["engine"] == "hf" and stage["metrics"]["sync_logprob_diff_max"] < 1e-4
    assert first_metrics(run_dir, "1-ppo")["kl"] == pytest.approx(0.0, abs=1e-6)
    before, after = mam_weights(run_dir, sft), mam_weights(run_dir, stage)
    assert set(before) == set(after) and changed_names(before, after) == set(before)
    assert any(n.startswith(BOTTLENECK_FILE) for n in before) and any(n.startswith("adapter_") for n in before)
    (policy,) = held
    trained = policy.policy_model
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    modules = {n for n in trainable if "_adapter." in n}
    assert trainable == {"prompt_encoder.policy.embedding.weight"} | modules
    assert {n.removeprefix("base_model.") for n in modules} == \
        {n.split(":")[1] for n in before if n.startswith(BOTTLENECK_FILE)}
    assert_base_is_the_toys(policy.own.base, toy_dir)
    assert_shared_base_is_the_toys(pipeline, toy_dir)
    reloaded = SharedPolicy.load(str(toy_dir / "model"))
    model = MamMethod(MamOptions(**MAM)).load(reloaded, "policy", run_dir / stage["artifacts"]["policy"])
    batch = reloaded.tokenizer([p + a for p, a in zip(PROMPTS, ANSWERS)], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, trained.eval()(**batch).logits)
    from alignment.evaluation import generate_greedy
    from alignment.export import Generator

    expected = [t.strip() for t, _ in generate_greedy(trained, reloaded.tokenizer, PROMPTS, 8)]
    assert [t.strip() for t in Generator(str(run_dir))(PROMPTS, max_new_tokens=8)] == expected  # `alignment generate`



def test_group_stage_with_mam_on_a_copy_of_its_own(toy_dir, runs, held):
    """SFT -> GRPO with MAM: the prefixes and the modules moved, KL 0 before the first update, the copy's base and
    the shared base stay the toy's."""
    pipeline, summary, run_dir = run_pipeline(runs, MAM, SFT_STAGE, {"kind": "grpo", **GROUP}, name="mam-grpo")
    sft, stage = summary["stages"]
    assert stage["engine"] == "hf"
    before, after = mam_weights(run_dir, sft), mam_weights(run_dir, stage)
    assert set(before) == set(after) and changed_names(before, after) == set(before)
    assert first_metrics(run_dir, "1-grpo")["kl"] == pytest.approx(0.0, abs=1e-6)
    assert_base_is_the_toys(held[0].own.base, toy_dir)
    assert_shared_base_is_the_toys(pipeline, toy_dir)



def test_reward_stage_with_mam_on_a_copy_of_its_own_then_ppo(toy_dir, runs, monkeypatch):
    """SFT (LoRA) -> reward (MAM: prefixes + parallel modules on its own copy of the base, not checkpointed) -> PPO
    with that reward model: every prefix vector and every module's up projection moved, the copy's base is
    the toy's bit for bit, the saved folder holds the prefix adapter (stock peft), the modules and the head (no model
    weights), and it scores as the trained model did, through its prefixes (loaded alone and beside the pipeline's
    policy); one PPO iteration runs with it as a separate frozen model; the shared base stays the toy's."""
    from reward_models import TrainedRewardModel
    from reward_models.trained import sequence_rewards

    trained = keep_reward_training(monkeypatch)
    reward = {**REWARD, "adapter": MAM, "gradient_checkpointing": True}
    pipeline, summary, run_dir = run_pipeline(runs, {"method": "lora", "r": 4}, SFT_STAGE, reward, PPO_ON_REWARD,
                                              name="mam-reward")
    assert [s["status"] for s in summary["stages"]] == ["done"] * 3
    folder = run_dir / summary["stages"][1]["artifacts"]["reward_model"]
    modules = load_file(str(folder / BOTTLENECK_FILE))
    assert modules and all("_adapter." in n for n in modules) and not (folder / "model.safetensors").exists()
    assert all(t.abs().max() > 0 for n, t in modules.items() if ".up." in n)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    (scorer, head, start), = trained
    prefixes = load_file(str(folder / "adapter_model.safetensors"))
    assert list(prefixes) == ["prompt_embeddings"]
    assert torch.equal(prefixes["prompt_embeddings"], scorer.model.prompt_encoder["reward"].embedding.weight)
    initial = start["prompt_encoder.reward.embedding.weight"]  # peft's random initialisation
    assert (prefixes["prompt_embeddings"] != initial).any(dim=1).all()  # every prefix vector moved
    assert_base_is_the_toys(scorer.base, toy_dir)
    texts = [p + a for p, a in zip(PROMPTS, ANSWERS)]
    with torch.no_grad():
        expected = sequence_rewards(scorer, None, head, texts, 512)
        with scorer.model.disable_adapter():  # the same modules without the prefixes score otherwise
            without = sequence_rewards(scorer, None, head, texts, 512)
    assert not torch.equal(expected, without)
    standalone = TrainedRewardModel.load(folder).score(PROMPTS, ANSWERS)
    on_policy = TrainedRewardModel.load(folder, policy=pipeline.policy()).score(PROMPTS, ANSWERS)
    assert torch.equal(standalone, expected) and torch.equal(on_policy, expected)
    assert first_metrics(run_dir, "2-ppo")["step"] == 1
    assert_shared_base_is_the_toys(pipeline, toy_dir)



def test_prefixed_reference_gives_trl_s_fused_head_the_log_probs_through_the_prefixes(toy_dir):
    """MAM's DPO/KTO reference is a peft prefix model TRL did not wrap: TRL's fused log-prob head (patched onto it as
    TRL does) reads the body through ``PrefixedReference``, so its per-token log-probs are the MAM model's own
    (log-softmax of its logits, prefixes and modules applied), not those of the body without the prefixes."""
    from trl.trainer.utils import add_fused_lm_head

    from alignment.methods import MamMethod, MamOptions
    from alignment.policy import PrefixedReference

    policy = SharedPolicy.load(str(toy_dir / "model"))
    model = MamMethod(MamOptions(**MAM)).prepare(policy, "policy")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_adapter.up" in name:
                param.add_(0.05)  # the modules start at zero: make them count
    model.eval().requires_grad_(False)
    batch = policy.tokenizer([p + a for p, a in zip(PROMPTS, ANSWERS)], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
        want = torch.log_softmax(logits, -1).gather(-1, labels[:, 1:].clamp(min=0)[:, :, None]).squeeze(-1)
        want = want.masked_fill(labels[:, 1:] == -100, 0)
        reference = PrefixedReference(model)
        add_fused_lm_head(reference)
        got = reference(**batch, labels=labels, fused_lm_head=True).log_probs
        with model.disable_adapter():  # the modules without the prefixes
            without = reference(**batch, labels=labels, fused_lm_head=True).log_probs
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - without).abs().max() > 1e-3



@pytest.mark.parametrize("kind", ["dpo", "kto", "orpo"])
def test_offline_preference_stage_with_mam(kind, toy_dir, runs):
    """SFT -> DPO/KTO/ORPO with MAM: the SFT artifact on a copy of the base of its own, every prefix and module
    tensor moved from its SFT value, the reference (a separate frozen copy with the SFT prefixes and modules, read by
    TRL through ``PrefixedReference``; ORPO has none) is the SFT policy bit for bit, the shared base stays the toy's."""
    offline = {"max_steps": 2, "batch_size": 4, "max_samples": 32, "eval_fraction": 0.0, "lr_scheduler": "constant",
               "warmup_ratio": 0.0, "learning_rate": 1.0e-3}
    pipeline, summary, run_dir = run_pipeline(runs, MAM, SFT_STAGE, {"kind": kind, **offline}, name=f"mam-{kind}")
    sft, stage = summary["stages"]
    assert stage["status"] == "done"
    before, after = mam_weights(run_dir, sft), mam_weights(run_dir, stage)
    assert set(before) == set(after) and changed_names(before, after) == set(before)
    assert any(n.startswith("adapter_model") for n in before) and any(n.startswith(BOTTLENECK_FILE) for n in before)
    if kind != "orpo":
        assert stage["metrics"]["reference_max_abs_diff"] == 0.0
    assert_shared_base_is_the_toys(pipeline, toy_dir)


@pytest.mark.parametrize("name", ["bottleneck", "ptuning", "mam"])
def test_ppo_on_a_copy_of_its_own_killed_and_resumed_ends_where_an_uninterrupted_run_does(name, tmp_path, toy_dir):
    """A policy on its own copy of the base is checkpointed as its trainable tensors (with the value adapter, head,
    optimisers and RNGs; P-tuning's prompt encoder, which peft's own save leaves out; MAM's prefixes and modules):
    kill -9 inside PPO, rerun, and every iteration's numbers and the final saved policy equal an uninterrupted run's."""
    from tests.test_resume import killed_and_resumed, logged

    adapter, files = {
        "bottleneck": (BOTTLENECK, (BOTTLENECK_FILE,)),
        "ptuning": ({"method": "ptuning", "num_virtual_tokens": 4}, PROMPT_LEARNING_FILES),
        "mam": (MAM, ("adapter_model.safetensors", BOTTLENECK_FILE)),
    }[name]
    raw = {"name": name, "model": str(toy_dir / "model"), "output_dir": str(tmp_path / "runs"), "adapter": adapter,
           "stages": [{**SFT_STAGE}, {**PPO, "iterations": 3}]}
    run, ref, _ = killed_and_resumed(tmp_path, raw, "1-ppo:step:2", "1-ppo from iter-00001")
    lines = logged(run / "1-ppo")
    assert [x["step"] for x in lines] == [1, 2, 3] and lines == logged(ref / "1-ppo")
    for file in files:
        got, want = (load_file(str(r / "1-ppo" / "adapters" / "policy" / file)) for r in (run, ref))
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
