"""The fine-tuning methods catalogue: what `adapter.method` selects, how each one makes a model trainable, how it is
saved and loaded, which stages accept it and how PPO gets its weights into the rollout engine.

Three families:

- **peft adapters** (lora, rslora, dora, qlora, ia3, prefix, prompt, ptuning): a named adapter on the shared base
  (``SharedPolicy.attach``); saved as stock peft folders. QLoRA also loads the shared base in 4-bit NF4.
- **base-weight methods** (full, freeze, head, modules, bitfit): they train some of the base's own parameters, so the
  trained policy is a plain model folder and nothing else may sit on those weights: online stages give the reference
  (and the reward/value adapters) a frozen copy of the base (``FrozenBasePolicy``).
- **inserted modules** (bottleneck, and mam = prefix tuning + a parallel bottleneck): small modules of ours hooked
  into every decoder layer (peft has no bottleneck adapter).

Option models are pydantic only (``alignment validate`` checks them without torch); the work is in the ``Method``
classes at the bottom, found with ``method_for(options)``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

if TYPE_CHECKING:
    import torch

    from alignment.policy import SharedPolicy

# ------------------------------------------------------------------------------------------------ options

ALL_STAGES = ("sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo", "rloo", "ewc", "multitask", "adapter_fusion")
LORA_TYPED_STAGES = ("sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo", "rloo", "ewc", "multitask")  # share a PeftModel with LoRA reward/value
OTHER_PEFT_STAGES = ("sft", "dpo", "kto", "orpo", "ewc", "multitask")  # peft forbids mixing adapter types (no LoRA
# reward/value adapters beside them); continual stages put none there
BASE_WEIGHT_STAGES = ("sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo", "rloo", "ewc", "multitask")  # a trained model of its own
LORA_FAMILY = ("lora", "rslora", "dora", "qlora")
MODULE_STAGES = ("sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo", "rloo", "ewc", "multitask")  # our bottleneck
# modules (the reward, preference and online stages load them onto a fresh copy of the base; continual stages, like
# SFT, hook them into the shared base for the stage)


class MethodOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    method: str


class LoraOptions(MethodOptions):
    """LoRA: low-rank updates ``B @ A`` (scaled by alpha / r) on the target linear layers."""

    method: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class RsLoraOptions(LoraOptions):
    """rsLoRA: LoRA scaled by alpha / sqrt(r) (stable at high rank)."""

    method: Literal["rslora"] = "rslora"


class DoraOptions(LoraOptions):
    """DoRA: LoRA on the direction plus a trained magnitude vector per output channel."""

    method: Literal["dora"] = "dora"


class QLoraOptions(LoraOptions):
    """QLoRA: LoRA on a base loaded in 4-bit NF4 (bitsandbytes); the whole shared base is quantised."""

    method: Literal["qlora"] = "qlora"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    double_quant: bool = True


class IA3Options(MethodOptions):
    """IA3: learned per-channel scaling of keys, values and the FFN input of the down projection."""

    method: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = None  # None: peft's default for the architecture (k, v, down on Llama)
    feedforward_modules: list[str] | None = None  # subset of target_modules scaled at their input


class PrefixOptions(MethodOptions):
    """Prefix tuning: trained key/value vectors prepended in every attention layer."""

    method: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(16, ge=1, le=512)
    projection: bool = False  # train the prefixes through an MLP (reparameterisation of the original paper)
    encoder_hidden_size: int = Field(128, ge=1)  # with `projection` only


class PromptOptions(MethodOptions):
    """Prompt tuning: trained input embeddings prepended to every sequence."""

    method: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(16, ge=1, le=512)
    init_text: str | None = None  # initialise the virtual tokens from this text's embeddings (default: random)


class PTuningOptions(MethodOptions):
    """P-tuning: virtual-token embeddings produced by a small prompt encoder (MLP or LSTM)."""

    method: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(16, ge=1, le=512)
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden_size: int = Field(128, ge=1)


class BottleneckOptions(MethodOptions):
    """Bottleneck adapters (down -> nonlinearity -> up, up initialised at zero) in every decoder layer."""

    method: Literal["bottleneck"] = "bottleneck"
    size: int = Field(32, ge=1)  # bottleneck width
    placement: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"  # after attn+FFN / after FFN / beside FFN
    activation: Literal["relu", "gelu", "silu"] = "relu"
    scaling: float = Field(1.0, gt=0)


class FullOptions(MethodOptions):
    """Full fine-tuning: every base parameter."""

    method: Literal["full"] = "full"


class FreezeOptions(MethodOptions):
    """Layer freezing: train only the top `train_top` decoder layers (or all but the bottom `freeze_bottom`)."""

    method: Literal["freeze"] = "freeze"
    train_top: int | None = Field(None, ge=1)
    freeze_bottom: int | None = Field(None, ge=1)
    train_final_norm: bool = True

    @model_validator(mode="after")
    def _one_of(self):
        if (self.train_top is None) == (self.freeze_bottom is None):
            raise ValueError("set exactly one of `train_top` or `freeze_bottom` (a number of decoder layers)")
        return self


class HeadOptions(MethodOptions):
    """Head-only: the output projection (lm_head). With tied embeddings that matrix is also the input embedding."""

    method: Literal["head"] = "head"
    train_final_norm: bool = False


class ModulesOptions(MethodOptions):
    """Module selection: train only these kinds of base module."""

    method: Literal["modules"] = "modules"
    train: list[Literal["attention", "mlp", "norms", "embeddings"]] = Field(default_factory=lambda: ["attention"],
                                                                          min_length=1)


class BitFitOptions(MethodOptions):
    """BitFit: bias terms only. Bias-free architectures (Llama, the toy) have none: `no_bias` says what then."""

    method: Literal["bitfit"] = "bitfit"
    no_bias: Literal["norms", "error"] = "norms"  # norms: train the normalisation gains instead (stated in the log)


class MamOptions(MethodOptions):
    """MAM (mix-and-match, He et al. 2022): prefix tuning in attention + a scaled parallel bottleneck beside the FFN."""

    method: Literal["mam"] = "mam"
    num_virtual_tokens: int = Field(16, ge=1, le=512)
    size: int = Field(64, ge=1)
    scaling: float = Field(4.0, gt=0)


OPTION_CLASSES: dict[str, type[MethodOptions]] = {
    c.model_fields["method"].default: c
    for c in (LoraOptions, RsLoraOptions, DoraOptions, QLoraOptions, IA3Options, PrefixOptions, PromptOptions,
              PTuningOptions, BottleneckOptions, FullOptions, FreezeOptions, HeadOptions, ModulesOptions,
              BitFitOptions, MamOptions)
}
METHODS = tuple(OPTION_CLASSES)


def _method_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("method", "lora")  # no `method:` means LoRA, as before the catalogue
    return getattr(value, "method", None)


AdapterSpec = Annotated[
    Union[tuple(Annotated[c, Tag(name)] for name, c in OPTION_CLASSES.items())],  # noqa: UP007
    Discriminator(_method_tag, custom_error_type="invalid_method",
                  custom_error_message=f"unknown `method`; use one of {', '.join(METHODS)} (see `alignment methods`)"),
]


def drop_foreign_options(block: Any, where: str) -> str | None:
    """After an override changed ``<where>.method``: drop the options the new method does not have (as a kind
    override does for stage fields); returns the warning, or None."""
    if not isinstance(block, dict) or block.get("method") not in OPTION_CLASSES:
        return None
    known = OPTION_CLASSES[block["method"]].model_fields
    dropped = sorted(k for k in block if k not in known)
    for k in dropped:
        del block[k]
    return f"{where}: method changed to {block['method']!r}; dropped options it does not have: {', '.join(dropped)}" \
        if dropped else None


# ------------------------------------------------------------------------------------------------ layer groups


def layer_group(param_name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for decoder layer i, num_layers + 1 for everything above (final norm, head) and for
    what sits outside the layers (virtual-token encoders)."""
    match = re.search(r"\.layers\.(\d+)\.", param_name)
    if match:
        return int(match.group(1)) + 1
    if "embed_tokens" in param_name or re.search(r"\bwte\b|embed_in", param_name):
        return 0
    return num_layers + 1


def num_layers(model) -> int:
    return model.config.num_hidden_layers


# ------------------------------------------------------------------------------------------------ methods


class Method:
    """One entry of the catalogue, bound to its options.

    rollout: how PPO gets the policy's weights into its engine: ``lora`` (vLLM serves the adapter; on CPU the
    engine's `auto` still merges), ``merged`` (full weights written and reloaded into vLLM), ``hf`` (HF engine only).
    """

    family: ClassVar[str]
    rollout: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    changes_base: ClassVar[bool] = False  # the trained policy is not an adapter on the shared, unchanged base
    own_copy: ClassVar[bool] = False  # the reward and online stages train it on a copy of the base of its own
    # (``online_copy``): it changes the base, or peft cannot hold it beside the LoRA reward/value adapters
    checkpoint_online: ClassVar[bool] = True  # gradient checkpointing of that copy (not for prefix tuning)
    note: ClassVar[str] = ""

    def __init__(self, options: MethodOptions):
        self.options = options

    @property
    def name(self) -> str:
        return self.options.method

    def prepare(self, policy: SharedPolicy, name: str):
        """Make ``policy`` trainable by this method under ``name``; returns the model a trainer should train."""
        raise NotImplementedError

    def save(self, policy: SharedPolicy, name: str, folder: Path) -> Path:
        raise NotImplementedError

    def load(self, policy: SharedPolicy, name: str, folder: Path, trainable: bool = False):
        """A saved policy back onto ``policy`` under ``name``; returns the model (as ``prepare``)."""
        raise NotImplementedError

    def release(self, policy: SharedPolicy, name: str) -> None:
        """After a stage: give the shared base back as it was loaded (base-weight and module methods)."""

    def online_copy(self, shared: SharedPolicy, folder: Path) -> SharedPolicy:
        """Online stages, for a method with ``own_copy``: the saved policy at ``folder`` on a copy of the base
        of its own, trainable by this method (``FrozenBasePolicy``); its ``model`` is what trains."""
        raise NotImplementedError

    def trainer_args(self) -> dict:
        """Extra TRL/transformers training arguments the method needs."""
        return {}

    def rollout_for(self, model) -> tuple[str, str]:
        """(rollout path, why) on this model: the class's path, unless the model rules it out."""
        return self.rollout, self.note


# ---------------------------------------------------------------------------------------- peft adapters


class PeftMethod(Method):
    family = "peft"
    rollout = "hf"
    stages = OTHER_PEFT_STAGES

    def peft_config(self, model):
        raise NotImplementedError

    def prepare(self, policy, name):
        policy.attach(name, self.peft_config(policy.base), trainable=True)
        policy.activate(name)
        return policy.model

    def save(self, policy, name, folder):
        policy.save_adapter(name, folder)
        return folder

    def load(self, policy, name, folder, trainable=False):
        policy.load_adapter(name, folder, trainable=trainable)
        return policy.model


class LoraMethod(PeftMethod):
    rollout = "lora"
    stages = ALL_STAGES
    extra: ClassVar[dict] = {}

    def peft_config(self, model):
        from peft import LoraConfig

        o = self.options
        return LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules,
                          task_type="CAUSAL_LM", **self.extra)


class RsLoraMethod(LoraMethod):
    stages = LORA_TYPED_STAGES
    extra = {"use_rslora": True}


class DoraMethod(LoraMethod):
    rollout = "merged"
    stages = LORA_TYPED_STAGES
    extra = {"use_dora": True}
    note = "vLLM serves no DoRA adapters: PPO merges it and reloads full weights"


class QLoraMethod(LoraMethod):
    rollout = "hf"
    stages = LORA_TYPED_STAGES
    note = "the shared base is loaded in 4-bit NF4 (bitsandbytes) for the whole run"

    def quantization_config(self):
        import torch
        from transformers import BitsAndBytesConfig

        o = self.options
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=o.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, o.compute_dtype))


class IA3Method(PeftMethod):
    rollout = "merged"
    stages = tuple(s for s in ALL_STAGES if s in (*OTHER_PEFT_STAGES, "reward", "ppo", "grpo", "rloo"))  # reward
    # and online: on a copy of the base of its own (see below; the reward folder: stages/reward.py)
    own_copy = True  # peft holds one adapter type per model: not beside the LoRA value/reward adapters or policy
    note = "IA3 scalings merge into the base weights; vLLM serves no IA3 adapters"

    def online_copy(self, shared, folder):
        own = fresh_copy(shared)
        own.load_adapter("policy", folder, trainable=True)  # only the IA3 scalings train
        return own

    def peft_config(self, model):
        from peft import IA3Config

        o = self.options
        return IA3Config(task_type="CAUSAL_LM", target_modules=o.target_modules,
                         feedforward_modules=o.feedforward_modules)


class PromptLearningMethod(PeftMethod):
    # Continued (DPO/KTO/ORPO, EWC chains) by policy.load_adapter: peft refuses is_trainable
    # for prompt learning, so the saved weights go into a fresh trainable adapter (peft saves P-tuning and prefix
    # tuning with `projection` as the virtual tokens their encoder computed; SharedPolicy.save_adapter writes the
    # encoder beside them). Prompt tuning and P-tuning prepend virtual tokens to the logits: TRL's DPO and KTO
    # trainers keep the real tokens' positions, its ORPO trainer does not (measured: "Expected input batch_size (132)
    # to match target batch_size (116)"), so our ORPO stage drops them in a forward hook (stages/orpo.py
    # ``real_token_trainer``); our own losses and evaluator drop them with policy.real_token_logits.
    # Online (PPO/GRPO/RLOO): on a copy of the base of its own, as IA3 (peft holds one adapter type per model, so not
    # beside the LoRA value/reward adapters); token_logprobs drops the virtual tokens' positions (real_token_logits).
    # Reward: on a copy of the base of its own too (own_copy, as IA3); sequence_rewards reads the hidden state
    # of the last real token through peft's forward (the virtual tokens come first; the bare backbone skips them).
    stages = ("sft",)
    own_copy = True
    note = "prompt-learning adapters cannot be merged or served by vLLM"

    def trainer_args(self):
        return {"gradient_checkpointing": False}  # checkpointed layers lose the virtual tokens' cache

    def online_copy(self, shared, folder):
        own = fresh_copy(shared)
        own.load_adapter("policy", folder, trainable=True)  # only the virtual tokens (or their encoder) train
        return own


class PrefixMethod(PromptLearningMethod):
    # Online, its copy runs without gradient checkpointing: transformers' checkpointed decoder layer drops the
    # prefixes' key/value cache (`past_key_values=None`; measured: the attention mask no longer fits, 16 vs 20).
    # Prompt tuning / P-tuning put their virtual tokens in the input embeddings, which checkpointing keeps.
    checkpoint_online = False

    stages = ("sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo", "rloo", "ewc", "multitask")  # also `projection`

    def peft_config(self, model):
        from peft import PrefixTuningConfig

        o = self.options
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens,
                                  prefix_projection=o.projection, encoder_hidden_size=o.encoder_hidden_size)


class PromptMethod(PromptLearningMethod):
    stages = ("sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo", "rloo", "ewc", "multitask")

    def peft_config(self, model):
        from peft import PromptTuningConfig

        o = self.options
        if o.init_text is None:
            return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens)
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens,
                                  prompt_tuning_init="TEXT", prompt_tuning_init_text=o.init_text,
                                  tokenizer_name_or_path=model.name_or_path)


class PTuningMethod(PromptLearningMethod):
    stages = ("sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo", "rloo", "ewc", "multitask")

    def peft_config(self, model):
        from peft import PromptEncoderConfig

        o = self.options
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens,
                                   encoder_reparameterization_type=o.encoder.upper(),
                                   encoder_hidden_size=o.encoder_hidden_size)


# ---------------------------------------------------------------------------------------- base-weight methods


class BaseWeightMethod(Method):
    """Trains a selection of the base's own parameters; the policy artifact is a plain model folder."""

    family = "base"
    rollout = "merged"
    stages = BASE_WEIGHT_STAGES
    changes_base = True
    own_copy = True

    def selected(self, model) -> list[str]:
        """Names of the base parameters this method trains."""
        raise NotImplementedError

    def prepare(self, policy, name):
        from alignment.errors import UserError

        if policy.adapters:
            raise UserError(f"adapter.method: {self.name!r} trains the base weights, but adapters "
                            f"({', '.join(policy.adapters)}) already sit on them; put this stage first or use `lora`")
        mark_trainable(policy.base, self.selected(policy.base))
        return policy.base

    def save(self, policy, name, folder):
        from alignment.io import atomic_dir

        with atomic_dir(Path(folder)) as tmp:
            policy.base.save_pretrained(tmp, safe_serialization=True)
            policy.tokenizer.save_pretrained(tmp)
            (tmp / "method.json").write_text(json.dumps(self.options.model_dump()))
        return folder

    def load(self, policy, name, folder, trainable=False):
        load_weights(policy.base, folder)
        mark_trainable(policy.base, self.selected(policy.base) if trainable else [])
        return policy.base

    def online_copy(self, shared, folder):
        from transformers import AutoModelForCausalLM

        from alignment.policy import SharedPolicy

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=shared.base.dtype).to(shared.base.device)
        mark_trainable(model, self.selected(model))
        return SharedPolicy(model, shared.tokenizer, shared.model_path)

    def release(self, policy, name):
        policy.restore_base()

    def rollout_for(self, model):
        embeddings = model.get_input_embeddings().weight
        tied = embeddings is model.get_output_embeddings().weight
        names = set(self.selected(model))
        if tied and any(p is embeddings for n, p in model.named_parameters() if n in names):
            return "hf", ("trains the tied input/output embeddings, which vLLM's in-place weight reload does not "
                          "update (its output head keeps the old matrix): HF engine")
        return self.rollout, self.note


def fresh_copy(shared: SharedPolicy) -> SharedPolicy:
    """A ``SharedPolicy`` on a fresh, frozen copy of the shared policy's base (as loaded from its folder)."""
    from transformers import AutoModelForCausalLM

    from alignment.policy import SharedPolicy

    base = AutoModelForCausalLM.from_pretrained(shared.model_path, dtype=shared.base.dtype).to(shared.base.device)
    base.requires_grad_(False)
    base.config.use_cache = True
    return SharedPolicy(base, shared.tokenizer, shared.model_path)


def mark_trainable(model, names) -> None:
    names = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def load_weights(model, folder: Path) -> None:
    """A model folder's weights (safetensors, possibly sharded) into ``model``, in place."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        from alignment.errors import UserError

        raise UserError(f"{folder}: weights do not fit the configured model (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")


class FullMethod(BaseWeightMethod):
    def selected(self, model):
        return [n for n, _ in model.named_parameters()]


class FreezeMethod(BaseWeightMethod):
    def selected(self, model):
        o, L = self.options, num_layers(model)
        first = L - o.train_top if o.train_top is not None else o.freeze_bottom
        out = [n for n, _ in model.named_parameters() if 1 + max(first, 0) <= layer_group(n, L) <= L]
        if o.train_final_norm:
            out += [n for n, _ in model.named_parameters() if layer_group(n, L) == L + 1 and "norm" in n]
        return out


class HeadMethod(BaseWeightMethod):
    """With tied embeddings (the toy) the head is the input embedding matrix: both are trained."""

    def selected(self, model):
        head = model.get_output_embeddings().weight
        out = [n for n, p in model.named_parameters() if p is head]
        if self.options.train_final_norm:
            out += [n for n, _ in model.named_parameters() if layer_group(n, num_layers(model)) == num_layers(model) + 1
                    and "norm" in n]
        return out


MODULE_PATTERNS = {
    "attention": r"\.self_attn\.",
    "mlp": r"\.mlp\.",
    "norms": r"norm",
    "embeddings": r"embed_tokens|\bwte\b|lm_head",
}


class ModulesMethod(BaseWeightMethod):
    def selected(self, model):
        pattern = "|".join(MODULE_PATTERNS[k] for k in self.options.train)
        return [n for n, _ in model.named_parameters() if re.search(pattern, n)]


class BitFitMethod(BaseWeightMethod):
    def has_bias(self, model) -> bool:
        return any(n.endswith(".bias") for n, _ in model.named_parameters())

    @property
    def note(self):
        return "bias-free models (Llama, the toy): trains the normalisation gains instead (no_bias: norms)"

    def selected(self, model):
        from alignment.errors import UserError

        if self.has_bias(model):
            return [n for n, _ in model.named_parameters() if n.endswith(".bias")]
        if self.options.no_bias == "error":
            raise UserError("adapter.method: bitfit trains bias terms, but this model has none; set "
                            "`no_bias: norms` to train the normalisation gains instead, or pick another method")
        import logging

        logging.getLogger("alignment").warning(
            "bitfit: the model has no bias terms; training the normalisation gains (RMSNorm/LayerNorm weights) instead")
        return [n for n, _ in model.named_parameters() if re.search(MODULE_PATTERNS["norms"], n)]


# ---------------------------------------------------------------------------------------- inserted modules


def _bottleneck_class():
    import torch

    class Bottleneck(torch.nn.Module):
        """``scaling * up(act(down(x)))``; ``up`` starts at zero, so an inserted adapter leaves the model unchanged."""

        def __init__(self, hidden: int, size: int, activation: str, scaling: float, dtype, device):
            super().__init__()
            self.down = torch.nn.Linear(hidden, size, dtype=dtype, device=device)
            self.up = torch.nn.Linear(size, hidden, dtype=dtype, device=device)
            self.act = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}[activation]()
            self.scaling = scaling
            self.parallel = False  # reads the sublayer's input (parallel placement) instead of its output
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, x):
            return self.scaling * self.up(self.act(self.down(x)))

        def apply_to(self, module, args, kwargs, output):
            """The forward hook on the sublayer. A bound method, not a closure: ``copy.deepcopy`` of the model then
            hooks the copied sublayer to the copied adapter (a closure would still call the original's)."""
            x = args[0] if args else kwargs["hidden_states"]
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + self(x if self.parallel else hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return Bottleneck


PLACEMENTS = {"houlsby": (("self_attn", False), ("mlp", False)), "pfeiffer": (("mlp", False),),
              "parallel": (("mlp", True),)}  # (sublayer, parallel: adapter reads the sublayer's input)


def insert_bottlenecks(model, size: int, placement: str, activation: str, scaling: float) -> list[str]:
    """Adds ``<sublayer>_adapter`` modules to every decoder layer, applied by forward hooks (so base parameter
    names stay as they are). Returns the new parameter names."""
    Bottleneck = _bottleneck_class()
    inner = getattr(model, model.base_model_prefix)
    ref = next(model.parameters())
    for layer in inner.layers:
        for sublayer, parallel in PLACEMENTS[placement]:
            adapter = Bottleneck(model.config.hidden_size, size, activation, scaling, ref.dtype, ref.device)
            adapter.parallel = parallel
            layer.add_module(f"{sublayer}_adapter", adapter)
            adapter.handle = getattr(layer, sublayer).register_forward_hook(adapter.apply_to, with_kwargs=True)
    return [n for n, _ in model.named_parameters() if "_adapter." in n]


def remove_bottlenecks(model) -> None:
    inner = getattr(model, model.base_model_prefix)
    for layer in inner.layers:
        for sublayer in ("self_attn", "mlp"):
            adapter = getattr(layer, f"{sublayer}_adapter", None)
            if adapter is not None:
                adapter.handle.remove()
                delattr(layer, f"{sublayer}_adapter")


BOTTLENECK_FILE = "bottleneck.safetensors"


class BottleneckMethod(Method):
    family = "modules"
    rollout = "hf"
    stages = MODULE_STAGES
    changes_base = True
    own_copy = True
    note = "our own modules: neither peft nor vLLM know them"

    def insert(self, policy) -> list[str]:
        o = self.options
        return insert_bottlenecks(policy.base, o.size, o.placement, o.activation, o.scaling)

    def prepare(self, policy, name):
        mark_trainable(policy.base, self.insert(policy))
        return policy.base

    def save(self, policy, name, folder):
        from alignment.io import atomic_dir

        with atomic_dir(Path(folder)) as tmp:
            self.save_modules(policy, tmp)
        return folder

    def save_modules(self, policy, folder: Path) -> None:
        from safetensors.torch import save_file

        state = {n: p.detach().contiguous() for n, p in policy.base.named_parameters() if "_adapter." in n}
        save_file(state, str(folder / BOTTLENECK_FILE))
        (folder / "method.json").write_text(json.dumps({**self.options.model_dump(), "base": policy.model_path}))

    def load(self, policy, name, folder, trainable=False):
        from safetensors.torch import load_file

        names = self.insert(policy)
        state = load_file(str(Path(folder) / BOTTLENECK_FILE))
        params = dict(policy.base.named_parameters())
        for n in names:
            params[n].data.copy_(state[n])
            params[n].requires_grad_(trainable)
        return policy.base

    def online_copy(self, shared, folder):
        own = fresh_copy(shared)
        self.load(own, "policy", folder, trainable=True)  # only the modules train; the copy's base stays frozen
        return own

    def release(self, policy, name):
        remove_bottlenecks(policy.base)


class MamMethod(BottleneckMethod):
    # Continual stages hook its modules into the shared base for the stage, as SFT. Online (PPO/GRPO/RLOO): the SFT
    # artifact (prefix adapter + modules) on a copy of the base of its own, both trainable (``online_copy``); the
    # reward stage: both on a copy of its own too (its folder: reward_models/trained.py). Those copies run without
    # gradient checkpointing, as prefix tuning's (a checkpointed layer drops the prefixes' key/value cache).
    family = "modules"
    stages = MODULE_STAGES
    own_copy = True
    checkpoint_online = False
    note = "prefix tuning (peft) + our parallel bottleneck: HF engine only"

    def online_copy(self, shared, folder):
        own = fresh_copy(shared)
        self.load(own, "policy", folder, trainable=True)  # the prefixes and the modules train; the base stays frozen
        return own

    def insert(self, policy):
        o = self.options
        return insert_bottlenecks(policy.base, o.size, "parallel", "relu", o.scaling)

    def trainer_args(self):
        return self.prefix().trainer_args()

    def prefix(self) -> PrefixMethod:
        return PrefixMethod(PrefixOptions(num_virtual_tokens=self.options.num_virtual_tokens))

    def prepare(self, policy, name):
        names = set(self.insert(policy))
        model = self.prefix().prepare(policy, name)
        policy.extra_trainable[name] = [p for n, p in policy.base.named_parameters() if n in names]
        policy.activate(name)
        return model

    def save(self, policy, name, folder):
        policy.save_adapter(name, folder)
        self.save_modules(policy, Path(folder))
        return folder

    def load(self, policy, name, folder, trainable=False):
        BottleneckMethod.load(self, policy, name, folder, trainable)
        policy.load_adapter(name, folder, trainable=trainable)
        if trainable:
            policy.extra_trainable[name] = [p for n, p in policy.base.named_parameters() if "_adapter." in n]
            policy.activate(name)
        return policy.model

    def release(self, policy, name):
        policy.extra_trainable.pop(name, None)
        policy.delete_adapter(name)
        remove_bottlenecks(policy.base)


METHOD_CLASSES: dict[str, type[Method]] = {
    "lora": LoraMethod, "rslora": RsLoraMethod, "dora": DoraMethod, "qlora": QLoraMethod, "ia3": IA3Method,
    "prefix": PrefixMethod, "prompt": PromptMethod, "ptuning": PTuningMethod, "bottleneck": BottleneckMethod,
    "full": FullMethod, "freeze": FreezeMethod, "head": HeadMethod, "modules": ModulesMethod, "bitfit": BitFitMethod,
    "mam": MamMethod,
}


def method_for(options: MethodOptions) -> Method:
    return METHOD_CLASSES[options.method](options)


def default_options(name: str) -> MethodOptions:
    """The method's options with their defaults (freeze: train the top decoder layer)."""
    if name == "freeze":
        return FreezeOptions(train_top=1)
    return OPTION_CLASSES[name]()


# ------------------------------------------------------------------------------------------------ validation


def stage_problems(index: int, kind: str, options: MethodOptions, where: str) -> list[str]:
    """A built-in stage kind that does not accept the method: one line naming the field and what to do."""
    method = method_for(options)
    if kind in ALL_STAGES and kind not in method.stages:
        return [f"{where}.method: a {kind!r} stage does not support method {method.name!r} (it supports: "
                f"{', '.join(method.stages)}); override `adapter:` for this stage, e.g. `adapter: {{method: lora}}` "
                "(see `alignment methods`)"]
    return []


def config_problems(config) -> list[str]:
    """Method checks across the pipeline: per-stage support, and QLoRA set where it can take effect."""
    problems = []
    for i, stage in enumerate(config.stages):
        where = f"stages.{i}.adapter" if stage.adapter is not None else "adapter"
        options = config.adapter_for(stage)
        problems += stage_problems(i, stage.kind, options, where)
        if stage.kind == "ewc" and getattr(stage, "objective", "sft") == "dpo" and options.method not in LORA_FAMILY:
            problems.append(f"{where}.method: an `ewc` stage with `objective: dpo` trains a LoRA-family adapter only "
                            f"(TRL's in-model `ref` copy of it is the reference), not {options.method!r}; use "
                            "`objective: sft` or a LoRA-family method (lora, rslora, dora, qlora)")
        if stage.adapter is not None and stage.adapter.method == "qlora" and config.adapter.method != "qlora":
            problems.append(f"stages.{i}.adapter.method: qlora quantises the shared base for the whole run; set "
                            "`method: qlora` in the top-level `adapter:` block instead")
    return problems


def quantization_for(config):
    """The bitsandbytes config the shared base is loaded with (QLoRA), or None."""
    if config.adapter.method == "qlora":
        return QLoraMethod(config.adapter).quantization_config()
    return None


# ------------------------------------------------------------------------------------------------ online stages


class FrozenBasePolicy:
    """What an online stage sees when the policy's method changes the base (it trains base weights: full, freeze,
    head, modules, bitfit; or hooks our bottleneck modules into the layers, MAM's with its prefix adapter) or is a
    peft adapter that cannot sit beside the LoRA value/reward adapters (IA3, prompt learning: peft holds one adapter
    type per model).

    Nothing can share weights or layers that the policy changes, so three models are held:
        `policy`     the trainable model: the SFT artifact on a copy of the base of its own (``Method.online_copy``)
        `reference`  a frozen copy of it as the stage starts (the SFT policy)
        shared base  the unchanged base of the run, where the reward and value adapters (LoRA) live
    Every name other than `policy`/`reference` is handed to the shared ``SharedPolicy``. The cost: two extra copies of
    the base weights (see ``memory_note``).
    """

    def __init__(self, shared: SharedPolicy, method: Method, folder: Path):
        self.shared, self.method = shared, method
        self.tokenizer, self.model_path = shared.tokenizer, shared.model_path
        self.own = method.online_copy(shared, folder)
        self.policy_model = self.own.model
        self.reference_model = copy.deepcopy(self.policy_model).eval()  # bottleneck hooks follow the copy
        self.reference_model.requires_grad_(False)

    def __getattr__(self, name):  # base, model, backbone, attach... of the shared base
        if name == "shared":
            raise AttributeError(name)
        return getattr(self.shared, name)

    def add_adapter(self, name: str, cfg) -> None:
        """Value adapters are LoRA on the frozen shared base, whatever the policy's method."""
        self.shared.add_adapter(name, cfg if cfg.method == "lora" else LoraOptions())

    def named_model(self, name: str):
        return {"policy": self.policy_model, "reference": self.reference_model}.get(name)

    def using(self, name: str):
        from alignment.policy import mixed_precision

        model = self.named_model(name)
        if model is None:
            return self.shared.using(name)
        return _entered(mixed_precision(model), model)

    def adapter_parameters(self, name: str) -> list:
        if name == "policy":
            return [p for p in self.policy_model.parameters() if p.requires_grad]
        return self.shared.adapter_parameters(name)

    def save_adapter(self, name: str, folder: Path) -> None:
        """`policy` in the format of the method's SFT artifact (a model folder, or bottleneck.safetensors)."""
        if name != "policy":
            return self.shared.save_adapter(name, folder)
        self.method.save(self.own, "policy", Path(folder))

    def policy_tensors(self) -> dict[str, torch.Tensor]:
        """The policy's trainable tensors, by name: what a checkpoint keeps of it (the rest is the SFT artifact)."""
        return {f"policy/{n}": p for n, p in self.policy_model.named_parameters() if p.requires_grad}

    def delete_adapter(self, name: str) -> None:
        if name == "reference":
            self.reference_model = None
        elif name != "policy":
            self.shared.delete_adapter(name)

    def activate(self, name: str, trainable=None) -> None:
        if self.named_model(name) is None and name != "policy":
            self.shared.activate(name, trainable)

    def checkpointing(self, on: bool = True):
        from alignment.policy import gradient_checkpointing

        # Prefix tuning and MAM: the policy's copy is not checkpointed (a checkpointed layer drops the prefixes'
        # key/value cache; their trainer_args turn it off for TRL); the shared base (value adapter) still is.
        own = [self.own.base] if self.method.checkpoint_online else []
        return gradient_checkpointing([*own, self.shared.base], on)

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full weights (for a full-weight reload into vLLM). A peft adapter on the copy (IA3) is
        merged into a throwaway copy: merging in place and unmerging would leave rounding in the copy's base."""
        import torch

        with torch.no_grad():
            model = copy.deepcopy(self.policy_model).merge_and_unload() if self.own.adapters else self.policy_model
            return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _entered(context, value):
    """``value`` yielded inside ``context``."""
    with context:
        yield value


def online_policy(ctx):
    """The policy an online stage trains: the shared one with `policy` and a frozen `reference` adapter, or, for a
    method that trains on a copy of its own (base-weight, bottleneck, MAM, IA3, prompt learning), a ``FrozenBasePolicy``
    (said on the console with its memory cost)."""
    method = method_for(ctx.adapter)
    policy = ctx.policy
    if not method.own_copy:
        policy.load_adapter("policy", ctx.artifact("policy"), trainable=True)
        policy.freeze_copy("policy", "reference")
        return policy
    from alignment.metrics import console

    what = {"base": "trains base weights", "modules": "hooks its modules into the base's layers",
            "peft": "is a peft adapter of another type than the LoRA value/reward adapters"}[method.family]
    if method.family == "peft":  # an earlier stage of this process left it (`policy`) on the shared base: unload it
        for name in [a for a in policy.adapters if policy.model.peft_config[a].peft_type != "LORA"]:
            policy.delete_adapter(name)
    console.print(f"adapter.method {method.name}: the policy {what}; it trains on its own copy of the base, the "
                  f"reference is a frozen copy and the reward/value adapters stay on the shared base "
                  f"({memory_note(policy.base, where=' in online stages')})")
    return FrozenBasePolicy(policy, method, ctx.artifact("policy"))


def rollout_path(ctx, model) -> tuple[str, str, str]:
    """(engine choice, sync, what to say) for an online stage's method on ``model``: `hf` methods force the HF
    engine, `merged` methods a full-weight reload; LoRA keeps the configured choice."""
    path, why = method_for(ctx.adapter).rollout_for(model)
    said = f"adapter.method {ctx.adapter.method}: PPO rollout path is {ROLLOUT_WORDS[path]}"
    said += f" ({why})" if why else ""
    if path == "hf":
        return "hf", "shared", said
    if path == "merged":
        return ctx.rollout.engine, "merged", said
    return ctx.rollout.engine, ctx.rollout.sync, said


ROLLOUT_WORDS = {"lora": "LoRA hot-swap in vLLM", "merged": "full-weight reload into vLLM", "hf": "HF engine only"}


def parameter_bytes(model) -> int:
    """Bytes of the base's own parameters (adapters other stages left on it not counted)."""
    adapter = re.compile(r"lora_|ia3_|_adapter\.|magnitude_vector")
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not adapter.search(n))


def memory_note(model, copies: int = 2, where: str = "") -> str:
    mb = parameter_bytes(model) / 2**20
    return f"+{copies} cop{'y' if copies == 1 else 'ies'} of the base weights{where}: +{copies * mb:.1f} MiB"


# ------------------------------------------------------------------------------------------------ catalogue


def count_trainable(model_path: str, options: MethodOptions, trust_remote_code: bool = False):
    """(trainable, total base parameters, base bytes, (rollout path, why)) of a method on a model, built on the meta
    device (no weights loaded; QLoRA is counted unquantised: its trainable LoRA parameters are the same)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from alignment.policy import SharedPolicy

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    base.name_or_path = model_path
    total, size = sum(p.numel() for p in base.parameters()), parameter_bytes(base)
    tokenizer = AutoTokenizer.from_pretrained(model_path) if getattr(options, "init_text", None) else None
    policy = SharedPolicy(base, tokenizer, model_path)
    method = method_for(options)
    rollout = method.rollout_for(base)
    model = method.prepare(policy, "policy")
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total, size, rollout


def catalogue(model_path: str, configured: MethodOptions | None = None) -> list[dict]:
    """One row per method: trainable params (count, %), stages, PPO rollout path, memory. The configured method's
    row uses its configured options; the others use defaults."""
    import logging

    rows, log = [], logging.getLogger("alignment")
    for name in METHODS:
        options = configured if configured is not None and configured.method == name else default_options(name)
        method = method_for(options)
        level, log.level = log.level, logging.ERROR  # the notes column says what bitfit's warning would
        try:
            trainable, total, size, (rollout, why) = count_trainable(model_path, options)
        finally:
            log.level = level
        if method.changes_base:  # base-weight methods, bottleneck, MAM
            memory = f"after SFT: a trained copy + a frozen reference copy, +{2 * size / 2**20:.1f} MiB"
        elif name == "qlora":
            memory = "shared base in 4-bit"
        elif method.own_copy:  # IA3, prompt learning
            copies = f"a trained copy + a frozen reference copy, +{2 * size / 2**20:.1f} MiB"
            memory = f"shared base; reward: a copy of its own, +{size / 2**20:.1f} MiB; PPO/GRPO/RLOO: {copies}"
        else:
            memory = "shared base"
        rows.append({
            "method": name, "trainable": trainable, "percent": 100.0 * trainable / total, "total": total,
            "stages": "all" if method.stages == ALL_STAGES else ", ".join(method.stages),
            "rollout": ROLLOUT_WORDS[rollout], "memory": memory, "note": why,
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | trainable | % | stages | PPO rollout | memory | note |", "|---|---:|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['percent']:.2f} | {r['stages']} | {r['rollout']} | "
                     f"{r['memory']} | {r['note']} |")
    return "\n".join(lines)
