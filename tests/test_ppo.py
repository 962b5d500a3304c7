"""PPO on the real toy model: one shared base, the sync check, the run's metrics, and the swap to DPO."""

from __future__ import annotations

import json

import pytest
import torch

from alignment.config import AdapterConfig
from alignment.policy import SharedPolicy
from alignment.rollout import Sampling
from alignment.rollout.hf import HFEngine
from stages.online import pack, sync_diff, token_logprobs
from tests.conftest import REPO, expect_gain, run_cli


def test_policy_reference_critic_and_reward_share_one_base(ppo_run, toy_dir):
    from reward_models import TrainedRewardModel

    _, _, run_dir = ppo_run
    policy = SharedPolicy.load(str(toy_dir / "model"))
    policy.load_adapter("policy", run_dir / "0-sft" / "adapters" / "policy", trainable=True)
    policy.freeze_copy("policy", "reference")
    policy.add_adapter("value", AdapterConfig())
    TrainedRewardModel.load(run_dir / "1-reward" / "reward_model", policy=policy)
    assert sorted(policy.adapters) == ["policy", "reference", "reward", "value"]
    q_proj = policy.model.get_base_model().model.layers[0].self_attn.q_proj
    assert set(q_proj.lora_A.keys()) == {"policy", "reference", "reward", "value"}
    # every adapter wraps the same base tensor: one copy of the base in memory
    base_tensors = {p.data_ptr() for n, p in policy.model.named_parameters() if "lora_" not in n}
    original = SharedPolicy.load(str(toy_dir / "model")).base
    assert len(base_tensors) == sum(1 for _ in original.parameters())
    assert sum(p.numel() for n, p in policy.model.named_parameters() if "lora_" not in n) == sum(
        p.numel() for p in original.parameters()
    )


def test_sync_check_small_when_in_sync_and_large_when_stale(sft_run):
    pipeline, _, _ = sft_run
    policy = pipeline.policy()
    policy.activate("policy")
    engine = HFEngine(policy)
    torch.manual_seed(0)
    rollout = engine.generate(["review of the soup in paris :"] * 8, Sampling(max_new_tokens=12))
    seq = pack(rollout, policy.tokenizer.pad_token_id, policy.base.device)
    with torch.no_grad():
        fresh, _ = token_logprobs(policy, "policy", seq, 1.0)
    in_sync = sync_diff(rollout, fresh, seq["response_mask"])
    assert in_sync[0] < 1e-3
    saved = policy.adapter_state("policy")
    try:
        with torch.no_grad():  # the trainer moves on but the engine's rollout is stale
            for n, p in policy.model.named_parameters():
                if ".policy." in n and "lora_B" in n:
                    p.add_(torch.randn_like(p) * 0.5)
            stale, _ = token_logprobs(policy, "policy", seq, 1.0)
        assert sync_diff(rollout, stale, seq["response_mask"])[0] > 0.1
    finally:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy.model, {k.replace(".policy.", "."): v for k, v in saved.items()},
                                  adapter_name="policy")


def test_ppo_improves_gold_with_the_default_vllm_engine(ppo_run):
    _, summary, run_dir = ppo_run
    ppo = summary["stages"][2]
    m = ppo["metrics"]
    # engine auto -> vLLM (installed, head size 64 supported), sync auto -> merged on CPU
    assert ppo["kind"] == "ppo" and ppo["engine"] == "vllm" and ppo["sync_mode"] == "merged"
    lines = [json.loads(x) for x in (run_dir / "2-ppo" / "metrics.jsonl").read_text().splitlines()]
    first, last = [x["reward"] for x in lines[:10]], [x["reward"] for x in lines[-10:]]
    assert sum(last) / 10 > sum(first) / 10 + 0.3  # the learned reward rises
    sft = summary["stages"][0]["metrics"]
    assert m["sync_logprob_diff_mean"] <= 0.05 and m["samples_per_s"] > 0
    assert ppo["artifacts"]["policy"] == "2-ppo/adapters/policy"
    for key in ("reward", "kl", "entropy", "approx_kl", "clipfrac", "vf_loss", "explained_variance", "response_length",
                "time_generate", "time_train"):
        assert key in lines[-1], key
    # checkpoints serve only a resume and go once the stage is DONE (their format and the resume: test_resume.py)
    assert not (run_dir / "2-ppo" / "checkpoints").exists()
    # The PPO issue's target: gold +0.25 over SFT. Toy v17 (docs/benchmarks.md, `alignment bench toy`): worlds 0-1
    # SFT 0.65 -> PPO 1.0 (one good adjective -> two), worlds 2-3 0.49 / 0.65 -> 0.65 (one late-alphabet adjective that
    # no second good one may follow): not yet on every world, so a miss xfails with its figures (another CPU's world 0
    # can behave like worlds 2-3)
    expect_gain(m["gold_reward"], sft["gold_reward"], 0.25, "PPO gold over SFT")


def test_swap_ppo_for_dpo_is_one_override(ppo_run):
    _, _, run_dir = ppo_run
    proc = run_cli("validate", str(REPO / "configs" / "sft_rm_ppo.yaml"), "stages.2.kind=dpo")
    assert proc.returncode == 0, proc.stderr
    assert "stages.2: kind changed to 'dpo'; dropped fields it does not have:" in proc.stderr
    assert "stages.1: the 'reward' stage produces reward_model but no later stage uses it" in proc.stderr
    # a few DPO steps: the swap is what this test checks (DPO's learning: test_reward_dpo.py on configs/sft_dpo.yaml)
    proc = run_cli("run", str(REPO / "configs" / "sft_rm_ppo.yaml"), "stages.2.kind=dpo", "stages.2.sft_weight=1.0",
                   "stages.2.max_steps=8", f"output_dir={run_dir.parent}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["skipped", "skipped", "done"]
    assert summary["stages"][2]["kind"] == "dpo" and summary["stages"][2]["dir"] == "2-dpo"
    assert summary["stages"][2]["metrics"]["train_pairs"] == 1900  # the reward stage's preference data (5 % held out)
    assert "gold_reward" in summary["stages"][2]["metrics"]


def test_ppo_with_the_toy_gold_reward_on_the_hf_engine(tmp_path):
    cfg = tmp_path / "gold.yaml"
    cfg.write_text(
        f"name: gold\noutput_dir: {tmp_path}/runs\nrollout: {{engine: hf}}\nstages:\n"
        "  - kind: sft\n    max_steps: 30\n"
        "  - kind: ppo\n    reward: toy_gold\n    iterations: 3\n    batch_size: 8\n    minibatch_size: 4\n"
    )
    proc = run_cli("run", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no training statistics; normalising with running statistics instead" in proc.stderr
    assert "rollout engine: hf (sync: shared)" in proc.stderr
    stage = json.loads((tmp_path / "runs" / "gold" / "summary.json").read_text())["stages"][1]
    assert stage["engine"] == "hf" and stage["status"] == "done" and "gold_reward" in stage["metrics"]


@pytest.mark.parametrize("variant", ["ppo", "ppo-shared-critic", "grpo"])
def test_one_pass_over_one_minibatch_takes_old_logprobs_from_the_training_forward(tmp_path, monkeypatch, variant):
    """ppo_epochs 1 x one minibatch holding the batch: the training forward runs before any update, so the loop takes
    the sampling policy's log-probs (and, with `critic: shared`, the critic's values) from it instead of a separate
    no-grad pass. Same numbers either way: the separate passes are forced back by patching `Minibatches.single` and
    the two runs are compared."""
    import shutil

    from alignment.pipeline import Pipeline
    from stages.online import Minibatches

    kind = variant.split("-")[0]
    cfg = tmp_path / "c.yaml"
    group = "    group_size: 2\n    batch_size: 4\n" if kind == "grpo" else "    batch_size: 8\n"
    group += "    critic: shared\n" if variant == "ppo-shared-critic" else ""
    cfg.write_text(
        "name: c\nrollout: {engine: hf}\nseed: 3\nstages:\n  - kind: sft\n    max_steps: 20\n"
        f"  - kind: {kind}\n    reward: toy_gold\n    iterations: 3\n{group}    minibatch_size: 8\n    ppo_epochs: 1\n"
        "    target_kl: null\n    learning_rate: 0.001\n"
    )
    Pipeline.from_yaml(cfg, [f"output_dir={tmp_path}/a"]).run()
    shutil.copytree(tmp_path / "a" / "c" / "0-sft", tmp_path / "b" / "c" / "0-sft")  # the same SFT policy, skipped
    monkeypatch.setattr(Minibatches, "single", property(lambda self: False))
    Pipeline.from_yaml(cfg, [f"output_dir={tmp_path}/b"]).run()

    def lines(side):
        return [json.loads(x) for x in (tmp_path / side / "c" / f"1-{kind}" / "metrics.jsonl").read_text().splitlines()]

    folded, separate = lines("a"), lines("b")
    assert len(folded) == len(separate) == 3
    for f, s in zip(folded, separate):
        for key in ("reward", "kl", "pg_loss", "approx_kl", "entropy") + (("vf_loss",) if kind == "ppo" else ()):
            assert f[key] == pytest.approx(s[key], abs=1e-4), (key, f[key], s[key])
    assert folded[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # ratio 1 at the single update: old == current
    from safetensors.torch import load_file

    weights = [load_file(next((tmp_path / side / "c" / f"1-{kind}").rglob("policy/adapter_model.safetensors")))
               for side in ("a", "b")]
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-5), name
    sft = load_file(next((tmp_path / "a" / "c" / "0-sft").rglob("adapter_model.safetensors")))
    changed = sum(not torch.equal(sft[n], t) for n, t in weights[0].items() if n in sft)
    assert changed > 0  # the policy did train
    if variant == "ppo-shared-critic":  # no `value` adapter: the critic is the policy's trunk + the saved head
        value = tmp_path / "a" / "c" / "1-ppo" / "adapters" / "value"
        assert sorted(p.name for p in value.iterdir()) == ["critic.json", "value_head.safetensors"]
        assert all(line["vf_loss"] > 0 for line in folded)


def test_ppo_with_a_shared_critic_improves_gold_as_much(ppo_run, tmp_path):
    """`critic: shared` (a value head on the policy's trunk: one forward/backward per minibatch instead of two, and
    no critic pass before the update) on the shipped chain, from the same SFT policy and reward model: the same
    issue target, gold +0.25 over SFT (measured 0.573 -> 0.995; the separate critic 1.000)."""
    import shutil

    from alignment.pipeline import Pipeline

    _, summary, run_dir = ppo_run
    for stage in ("0-sft", "1-reward"):  # the same SFT policy and reward model: skipped by their fingerprints
        shutil.copytree(run_dir / stage, tmp_path / "sft_rm_ppo" / stage)
    shared = Pipeline.from_yaml(REPO / "configs" / "sft_rm_ppo.yaml",
                                [f"output_dir={tmp_path}", "logging.log_every=50", "stages.2.critic=shared"]).run()
    assert [s["status"] for s in shared["stages"]] == ["skipped", "skipped", "done"]
    sft, ppo = summary["stages"][0]["metrics"], shared["stages"][2]["metrics"]
    assert not (tmp_path / "sft_rm_ppo" / "2-ppo" / "adapters" / "value" / "adapter_model.safetensors").exists()
    expect_gain(ppo["gold_reward"], sft["gold_reward"], 0.25, "PPO (shared critic) gold over SFT")


def test_shared_critic_reads_the_hidden_state_the_lm_head_reads(sft_run):
    """`critic: shared` puts the value head on the hidden state the policy's LM head reads at each response position:
    the same tensor as the backbone's last hidden state there, from the same forward that gives the log-probs."""
    pipeline, _, _ = sft_run
    policy = pipeline.policy()
    policy.activate("policy")
    torch.manual_seed(0)
    rollout = HFEngine(policy).generate(["review of the soup in paris :"] * 4, Sampling(max_new_tokens=8))
    seq = pack(rollout, policy.tokenizer.pad_token_id, policy.base.device)
    with torch.no_grad():
        logprobs, _, hidden = token_logprobs(policy, "policy", seq, 1.0, with_hidden=True)
        plain, _ = token_logprobs(policy, "policy", seq, 1.0)
        with policy.using("policy"):
            last = policy.backbone()(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"],
                                     use_cache=False).last_hidden_state
    assert torch.equal(logprobs, plain)
    assert torch.equal(hidden, last.gather(1, seq["positions"][:, :, None].expand(-1, -1, last.shape[-1])))
    head = policy.model.get_output_embeddings()
    chosen = torch.log_softmax(head(hidden).float(), -1).gather(-1, seq["response_ids"][:, :, None]).squeeze(-1)
    assert torch.allclose(chosen, logprobs, atol=1e-5)
