"""The `gpu` tests: our losses on CUDA tensors and short real chains on a CUDA device (skipped without CUDA).

`scripts/gpu_check.sh` runs them (`pytest -m gpu`) on a GPU box; on a CPU machine they are collected and skipped.
Every loss must build its tensors on its inputs' device, and give the numbers it gives on the CPU: each maths test
computes the same thing on both and compares. The chains (SFT -> reward -> PPO on the HF engine, SFT -> DPO, an EWC
chain with the DPO objective) are a few steps each on the toy model: they show that the stages run on CUDA end to end,
not what they learn.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="runs on CUDA")]

CUDA = "cuda"


def both(fn, *tensors, dtype=torch.float32):
    """fn on CPU tensors and on the same tensors moved to CUDA: (cpu result, cuda result)."""
    return fn(*(t.to(dtype) if t.is_floating_point() else t for t in tensors)), \
        fn(*((t.to(dtype) if t.is_floating_point() else t).to(CUDA) for t in tensors))


def assert_same(cpu, gpu, atol=1e-5):
    assert gpu.device.type == CUDA, gpu.device
    torch.testing.assert_close(gpu.float().cpu(), cpu.float(), atol=atol, rtol=1e-4)


def ppo_batch(seed: int = 0, B: int = 4, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 5, 3, 1])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    logprobs = -torch.rand(B, T, generator=g) * 3
    return {
        "logprobs": logprobs, "old": logprobs + 0.3 * torch.randn(B, T, generator=g),
        "ref": logprobs + 0.5 * torch.randn(B, T, generator=g), "values": torch.randn(B, T, generator=g),
        "scores": torch.randn(B, generator=g), "mask": mask,
    }


# --------------------------------------------------------------------------------------------- reward model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bradley_terry_with_margin_on_cuda(dtype):
    """The reward stage's loss: rewards on the model's device, the per-row margin built from the rows (on the CPU)."""
    from alignment.algorithms.preference import bradley_terry_loss, pairwise_accuracy, tie_rate

    chosen = torch.tensor([1.0, 0.0, 2.0, 0.5])
    rejected = torch.tensor([0.0, 0.5, 2.0, -1.0])
    for margin in (0.0, 0.5, torch.tensor([0.0, 0.5, 1.0, 0.25])):  # a `margin` column: a CPU tensor
        cpu = bradley_terry_loss(chosen.to(dtype), rejected.to(dtype), margin)
        c = chosen.to(dtype).to(CUDA).requires_grad_()
        gpu = bradley_terry_loss(c, rejected.to(dtype).to(CUDA), margin)
        assert_same(cpu, gpu, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
        gpu.backward()
        assert c.grad is not None and c.grad.device.type == CUDA
    assert pairwise_accuracy(chosen.to(CUDA), rejected.to(CUDA)) == pairwise_accuracy(chosen, rejected)
    assert tie_rate(chosen.to(CUDA), rejected.to(CUDA)) == tie_rate(chosen, rejected) == 0.25


# --------------------------------------------------------------------------------------------- DPO


def test_dpo_sigmoid_loss_on_cuda():
    """DPO is Bradley-Terry on the implicit rewards beta * (log pi - log pi_ref): the same numbers on CUDA, and the
    EWC stage's per-sample DPO loss (the form its Fisher differentiates) agrees with it."""
    from alignment.algorithms.preference import bradley_terry_loss

    g = torch.Generator().manual_seed(1)
    policy_c, policy_r, ref_c, ref_r = (-torch.rand(8, generator=g) * 20 for _ in range(4))
    beta = 0.1

    def dpo(pc, pr, rc, rr):
        return bradley_terry_loss(beta * (pc - rc), beta * (pr - rr))

    def by_hand(pc, pr, rc, rr):
        return -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()

    cpu, gpu = both(dpo, policy_c, policy_r, ref_c, ref_r)
    assert_same(cpu, gpu)
    assert_same(by_hand(policy_c, policy_r, ref_c, ref_r), gpu)


# --------------------------------------------------------------------------------------------- PPO


def test_ppo_losses_on_cuda():
    from alignment.algorithms.gae import gae
    from alignment.algorithms.group import grpo_advantages, rloo_advantages
    from alignment.algorithms.ppo import (explained_variance, kl_estimate, kl_shaped_rewards, masked_whiten,
                                          policy_loss, value_loss)

    b = ppo_batch()
    for kind in ("k1", "k3"):
        assert_same(*both(lambda p, r: kl_estimate(p, r, kind), b["logprobs"], b["ref"]))
    kl = kl_estimate(b["logprobs"], b["ref"], "k1")
    rewards_cpu, rewards_gpu = both(lambda s, k, m: kl_shaped_rewards(s, k, m, 0.05), b["scores"], kl, b["mask"])
    assert_same(rewards_cpu, rewards_gpu)
    adv_cpu, ret_cpu = gae(rewards_cpu, b["values"], b["mask"], 1.0, 0.95)
    adv_gpu, ret_gpu = gae(rewards_gpu, b["values"].to(CUDA), b["mask"].to(CUDA), 1.0, 0.95)
    assert_same(adv_cpu, adv_gpu)
    assert_same(ret_cpu, ret_gpu)
    assert_same(*both(masked_whiten, adv_cpu, b["mask"]))

    def pg(new, old, adv, mask):
        return policy_loss(new, old, adv, mask, 0.2)

    (loss_cpu, stats_cpu), (loss_gpu, stats_gpu) = both(pg, b["logprobs"], b["old"], adv_cpu, b["mask"])
    assert_same(loss_cpu, loss_gpu)
    assert stats_gpu == pytest.approx(stats_cpu, abs=1e-5)
    new = b["logprobs"].to(CUDA).requires_grad_()
    loss, _ = policy_loss(new, b["old"].to(CUDA), adv_gpu, b["mask"].to(CUDA), 0.2)
    loss.backward()
    assert new.grad.device.type == CUDA and torch.isfinite(new.grad).all()

    for clip in (None, 0.2):
        (vl_cpu, vs_cpu), (vl_gpu, vs_gpu) = both(lambda v, o, r, m: value_loss(v, o, r, m, clip),
                                                  b["values"] + 0.1, b["values"], ret_cpu, b["mask"])
        assert_same(vl_cpu, vl_gpu)
        assert vs_gpu == pytest.approx(vs_cpu, abs=1e-5)
    assert explained_variance(b["values"].to(CUDA), ret_gpu, b["mask"].to(CUDA)) == pytest.approx(
        explained_variance(b["values"], ret_cpu, b["mask"]), abs=1e-4)

    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, -1.0])
    assert_same(*both(lambda s: grpo_advantages(s, 2), scores))
    assert_same(*both(lambda s: rloo_advantages(s, 3), scores))


# --------------------------------------------------------------------------------------------- EWC


def test_ewc_fisher_and_penalty_on_cuda():
    """The Fisher from per-sample gradients of CUDA parameters; the penalty against a Fisher and anchor loaded from
    safetensors (on the CPU) stays on the parameters' device and equals the CPU figure; online EWC mixes the two."""
    from alignment.algorithms.ewc import ewc_penalty, fisher_diagonal, online_fisher

    g = torch.Generator().manual_seed(2)
    weights = {"a.lora_A.weight": torch.randn(4, 8, generator=g), "a.lora_B.weight": torch.randn(8, 4, generator=g)}
    xs = [torch.randn(8, generator=g) for _ in range(5)]

    def fisher_on(device):
        params = {n: w.to(device).requires_grad_() for n, w in weights.items()}
        losses = [lambda x=x: (params["a.lora_B.weight"] @ (params["a.lora_A.weight"] @ x.to(device))).pow(2).mean()
                  for x in xs]
        return params, fisher_diagonal(params, losses)

    params_cpu, fisher_cpu = fisher_on("cpu")
    params_gpu, fisher_gpu = fisher_on(CUDA)
    for name in weights:
        assert_same(fisher_cpu[name], fisher_gpu[name], atol=1e-4)
    anchor = {n: w + 0.1 for n, w in weights.items()}  # as loaded from penalty-*.safetensors: CPU tensors
    cpu = ewc_penalty(params_cpu, fisher_cpu, anchor)
    gpu = ewc_penalty(params_gpu, fisher_cpu, anchor)
    assert_same(cpu, gpu, atol=1e-4)
    gpu.backward()
    assert all(p.grad is not None and p.grad.device.type == CUDA for p in params_gpu.values())
    assert ewc_penalty(params_gpu, {}, {}).device.type == CUDA  # no terms: a zero on the parameters' device
    mixed = online_fisher(fisher_cpu, {n: f.to(CUDA) for n, f in fisher_gpu.items()}, 0.5)
    assert all(f.device.type == CUDA for f in mixed.values())


# --------------------------------------------------------------------------------------------- short chains


def _write_config(path, text: str):
    path.write_text(text)
    return path


def test_sft_reward_ppo_chain_on_cuda_with_the_hf_engine(toy_dir, tmp_path):
    """SFT -> reward model (a per-row `margin` column: the CPU-built margin meets CUDA rewards) -> PPO, a few steps
    each, on the HF rollout engine."""
    from alignment.data import load_rows
    from alignment.pipeline import Pipeline

    pairs = tmp_path / "pairs.jsonl"
    rows = load_rows("toy:preference")[:64]
    pairs.write_text("".join(json.dumps({**r, "margin": 0.5 * (i % 2)}) + "\n" for i, r in enumerate(rows)))
    cfg = _write_config(tmp_path / "chain.yaml", (
        f"name: gpu_chain\nmodel: toy\noutput_dir: {tmp_path}/runs\nrollout: {{engine: hf}}\nlogging: {{log_every: 1}}\n"
        "stages:\n"
        "  - kind: sft\n    data: toy:sft\n    max_steps: 20\n"
        f"  - kind: reward\n    data: {pairs}\n    max_steps: 6\n    batch_size: 8\n"
        "  - kind: ppo\n    prompts: toy:prompts\n    iterations: 2\n    batch_size: 8\n    minibatch_size: 4\n"
        "    max_new_tokens: 16\n"
    ))
    pipeline = Pipeline.from_yaml(cfg)
    summary = pipeline.run()
    stages = summary["stages"]
    assert [s["status"] for s in stages] == ["done", "done", "done"], stages
    assert stages[2]["engine"] == "hf"
    assert torch.isfinite(torch.tensor(stages[1]["metrics"]["train_loss"]))
    steps = [json.loads(x) for x in (tmp_path / "runs" / "gpu_chain" / "2-ppo" / "metrics.jsonl").read_text().splitlines()]
    assert steps and all(torch.isfinite(torch.tensor(float(s["kl"]))) for s in steps if "kl" in s)
    assert pipeline.policy().model.device.type == CUDA


def test_sft_dpo_on_cuda(toy_dir, tmp_path):
    """TRL's DPOTrainer (sigmoid loss + the RPO term of `sft_weight`) against the frozen SFT reference, on CUDA."""
    from alignment.pipeline import Pipeline

    cfg = _write_config(tmp_path / "dpo.yaml", (
        f"name: gpu_dpo\nmodel: toy\noutput_dir: {tmp_path}/runs\nlogging: {{log_every: 1}}\nstages:\n"
        "  - kind: sft\n    data: toy:sft\n    max_steps: 10\n"
        "  - kind: dpo\n    data: toy:preference\n    max_steps: 4\n    batch_size: 8\n    sft_weight: 1.0\n"
    ))
    summary = Pipeline.from_yaml(cfg).run()
    assert [s["status"] for s in summary["stages"]] == ["done", "done"], summary["stages"]


def test_ewc_chain_with_the_dpo_objective_on_cuda(toy_dir, tmp_path):
    """Two EWC tasks: the Fisher of task 1 (per-sample DPO losses on CUDA) is saved, loaded back (CPU tensors) and
    applied to the CUDA adapter while task 2 trains."""
    from alignment.config import config_from_dict
    from alignment.pipeline import Pipeline

    short = {"max_steps": 4, "batch_size": 4, "max_samples": 16, "fisher_samples": 4, "objective": "dpo",
             "ewc_lambda": 50.0}
    raw = {"name": "gpu_ewc", "model": "toy", "output_dir": str(tmp_path), "logging": {"log_every": 1},
           "continual": {"evaluate": "all", "eval_samples": 16},
           "stages": [{"kind": "ewc", "data": "toy:task/sentiment", **short},
                      {"kind": "ewc", "data": "toy:task/topic", **short}]}
    config, warnings = config_from_dict(raw)
    summary = Pipeline(config, warnings).run()
    assert [s["status"] for s in summary["stages"]] == ["done", "done"]
    assert summary["stages"][1]["metrics"]["ewc_tasks_protected"] == 1
    logged = [json.loads(x) for x in (tmp_path / "gpu_ewc" / "1-ewc" / "metrics.jsonl").read_text().splitlines()]
    assert any(x.get("ewc_penalty", 0) > 0 for x in logged)
