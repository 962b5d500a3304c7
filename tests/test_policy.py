"""The shared policy: named adapters on one base, frozen copies stay frozen, save/load round trip."""

from __future__ import annotations

import pytest
import torch

from alignment.config import AdapterConfig
from alignment.errors import UserError
from alignment.policy import SharedPolicy


@pytest.fixture()
def policy(toy_dir):
    torch.manual_seed(0)
    return SharedPolicy.load(str(toy_dir / "model"))


def grads(policy, name):
    return {n: p.requires_grad for n, p in policy.model.named_parameters() if f".{name}." in n}


def test_named_adapters_share_one_base(policy):
    policy.add_adapter("policy", AdapterConfig(r=4))
    policy.add_adapter("value", AdapterConfig(r=4))
    assert policy.adapters == ["policy", "value"]
    policy.activate("policy")
    assert all(grads(policy, "policy").values()) and not any(grads(policy, "value").values())
    base_params = [p for n, p in policy.model.named_parameters() if "lora_" not in n]
    assert base_params and not any(p.requires_grad for p in base_params)
    assert {id(p) for p in policy.trainable_parameters()} == {
        id(p) for n, p in policy.model.named_parameters() if ".policy." in n
    }


def test_frozen_copy_stays_frozen_when_activated(policy):
    policy.add_adapter("policy", AdapterConfig(r=4))
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if ".policy." in n:
                p.add_(0.01)
    policy.freeze_copy("policy", "reference")
    policy.activate("reference")  # peft's set_adapter would turn requires_grad on: we keep it off
    assert not any(grads(policy, "reference").values())
    ref, pol = policy.adapter_state("reference"), policy.adapter_state("policy")
    assert ref.keys() == pol.keys() and all(torch.equal(ref[k], pol[k]) for k in ref)
    policy.activate("policy")
    assert all(grads(policy, "policy").values()) and not any(grads(policy, "reference").values())


def test_save_load_round_trip_and_base_check(policy, tmp_path, toy_dir):
    policy.add_adapter("policy", AdapterConfig(r=4))
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    batch = policy.tokenizer(["review of the soup in paris :"], return_tensors="pt")
    before = policy.model(**batch).logits
    policy.save_adapter("policy", tmp_path / "policy")
    policy.delete_adapter("policy")
    policy.load_adapter("policy", tmp_path / "policy")
    assert torch.allclose(policy.model(**batch).logits, before, atol=1e-6)
    with policy.disabled() as bare:
        assert not torch.allclose(bare(**batch).logits, before)

    import json

    cfg = tmp_path / "policy" / "adapter_config.json"
    data = json.loads(cfg.read_text())
    data["base_model_name_or_path"] = "some-org/another-model"
    cfg.write_text(json.dumps(data))
    with pytest.raises(UserError, match="adapter was trained on base 'some-org/another-model'"):
        policy.load_adapter("policy", tmp_path / "policy")


def test_tokenizer_without_pad_or_chat_template_gets_defaults(toy_dir):
    from alignment.policy import load_tokenizer, prepare_tokenizer

    tok = load_tokenizer(str(toy_dir / "model"))
    tok.pad_token = None
    tok.chat_template = None
    prepare_tokenizer(tok)
    assert tok.pad_token == "</s>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "user : hi\nassistant : "


def test_gradient_checkpointing_saves_fewer_activations_and_gives_the_same_gradients(policy):
    """Inside `policy.checkpointing()` the decoder layers keep only their inputs for backward; the gradients are the
    same, and outside the block the model is back in eval mode with its KV cache (generation is unchanged)."""
    policy.add_adapter("policy", AdapterConfig(r=4))
    policy.activate("policy")
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    policy.model.eval()
    ids = torch.randint(3, policy.base.config.vocab_size, (4, 24))

    def step(on: bool):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        policy.model.zero_grad(set_to_none=True)
        with policy.checkpointing(on), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            policy.model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean().backward()
        return sum(saved), {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}

    plain_bytes, plain = step(False)
    ckpt_bytes, ckpt = step(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6), n
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in policy.base.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and not any(m.training for m in layers)  # eval again after the block
    # generation with the KV cache works again after the block (min_new_tokens: where the toy stops does not matter)
    with torch.no_grad():
        cached, uncached = (policy.model.generate(input_ids=ids[:1, :5], max_new_tokens=3, min_new_tokens=3,
                                                  do_sample=False, use_cache=c) for c in (True, False))
    assert cached.shape[1] == 8 and torch.equal(cached, uncached)


def test_half_precision_base_runs_adapters_under_autocast(toy_dir):
    """With a bf16 base, peft keeps LoRA weights in float32; `using()` autocasts (as Trainer does for TRL's stages),
    so the adapter matmuls run in bf16 while the trained weights and their gradients stay float32. In float32 nothing
    changes."""
    policy = SharedPolicy.load(str(toy_dir / "model"), dtype="bfloat16")
    policy.add_adapter("policy", AdapterConfig(r=4))
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    lora = [m for n, m in policy.model.named_modules() if n.endswith("lora_A.policy")][0]
    out_dtypes = []
    lora.register_forward_hook(lambda m, i, o: out_dtypes.append(o.dtype))
    ids = torch.randint(3, policy.base.config.vocab_size, (2, 12))
    with policy.using("policy") as model:
        logits = model(input_ids=ids, use_cache=False).logits
    assert out_dtypes[-1] == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = policy.model(input_ids=ids, use_cache=False).logits
    assert torch.equal(logits, expected)
    logits.float().logsumexp(-1).mean().backward()
    trained = [p for p in policy.adapter_parameters("policy")]
    assert trained and all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                           for p in trained)
    with torch.no_grad():
        policy.model(input_ids=ids, use_cache=False)  # outside `using`: peft's float32 path
    assert out_dtypes[-1] == torch.float32

    fp32 = SharedPolicy.load(str(toy_dir / "model"))
    fp32.add_adapter("policy", AdapterConfig(r=4))
    with fp32.using("policy") as model:
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_weights_for_vllm_leave_the_shared_base_bit_identical(toy_dir, method):
    """The `merged` sync writes base + `policy` merged; the shared base (under the reference, reward and value
    adapters too) must come out bit for bit as it went in, which peft's merge + unmerge does not guarantee."""
    import copy

    from alignment.methods import OPTION_CLASSES
    from alignment.rollout.vllm import _merged_state

    policy = SharedPolicy.load(str(toy_dir / "model"))
    policy.add_adapter("policy", OPTION_CLASSES[method]())
    policy.add_adapter("value", AdapterConfig(r=4)) if method != "ia3" else None
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if ".policy" in n and ("lora_B" in n or "ia3_l" in n or "magnitude" in n):
                p.add_(torch.randn_like(p) * 0.05)
    before = {n: p.detach().clone() for n, p in policy.base.named_parameters()}
    state = _merged_state(policy)
    after = dict(policy.base.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    with policy.using("policy") as model:
        merged = copy.deepcopy(model)
    merged.delete_adapter("value") if method != "ia3" else None
    expected = merged.merge_and_unload().state_dict()
    assert set(expected) - {"lm_head.weight"} <= set(state)
    for name, tensor in expected.items():
        assert torch.allclose(state[name], tensor, atol=1e-6), name
    plain = {n.replace(".base_layer.", "."): t for n, t in before.items()}
    assert any(not torch.equal(state[n], plain[n]) for n in plain if n in state)  # the adapter was merged in
