"""The shared policy: one base model in memory with named peft adapters (policy, value, reward, per task).

peft's ``set_adapter`` turns ``requires_grad`` on for the adapter it activates, so every switch here re-applies
which adapters are trainable, frozen copies are created in inference mode, and optimisers get explicit parameter
lists (``trainable_parameters``). Adapters are saved as stock peft folders (``PeftModel.from_pretrained`` loads
them) and record the base they belong to.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from pathlib import Path

import torch

from alignment.errors import UserError
from alignment.methods import MethodOptions

log = logging.getLogger("alignment")

# Each assistant turn ends with the eos token: SFT on chat rows learns where an answer ends (TRL appends eos only to
# plain-text rows; a chat row gets exactly what its template renders), and generation stops there.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }}"
    "{{ eos_token if message['role'] == 'assistant' else '' }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def resolve_model_path(model_ref: str) -> str:
    from alignment.toy import world_of

    if world_of(model_ref) is not None:
        from alignment.toy.build import ensure_toy

        return str(ensure_toy(world_of(model_ref)) / "model")
    return model_ref


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU training in bf16 is slower and less exact than fp32 at small sizes
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return prepare_tokenizer(tokenizer, path)


def prepare_tokenizer(tokenizer, path: str = "the model"):
    """A pad token (reusing eos or unk, never resizing embeddings) and a chat template, each logged if added."""
    if tokenizer.eos_token is None:
        raise UserError(
            f"model: tokenizer of {path!r} has no eos token; set `eos_token` in its tokenizer_config.json (answers "
            "must be able to end: SFT appends it, generation stops on it)"
        )
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(
                f"model: tokenizer of {path!r} has no pad, eos or unk token to pad with; add a pad token to its "
                "tokenizer_config.json (embeddings are never resized: vLLM could not serve such adapters)"
            )
        tokenizer.pad_token = fallback
        log.info("tokenizer has no pad token: padding with %r (embeddings are never resized; padding is masked by "
                 "the attention mask, so a real %r at an answer's end is still learned)", fallback, fallback)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        log.info("tokenizer has no chat template: using the default 'role : content' template (each assistant turn "
                 "ends with %r)", tokenizer.eos_token)
    _eos_text_round_trips(tokenizer, path)
    return tokenizer


def _say_stop_ids(tokenizer, model) -> None:
    """One log line when the model ends answers on more than the tokenizer's eos (both rollout engines, the gold and
    task evaluators and ``finished`` use that set: alignment.rollout.stop_token_ids)."""
    from alignment.rollout import describe_stop_ids, stop_token_ids

    line = describe_stop_ids(tokenizer, stop_token_ids(tokenizer, model))
    if line:
        log.info(line)


def _eos_text_round_trips(tokenizer, path: str) -> None:
    """The trainers append eos to answers as text (TRL's SFT/DPO/KTO/ORPO: ``completion + eos_token``; the chat
    template: ``{{ eos_token }}``): the tokenizer must read that text back as the one eos id, or the answers are
    trained without their end. A tokenizer with ``split_special_tokens`` splits it into ordinary pieces: switched off,
    with a line saying why."""
    def eos_ids():  # an answer's last word with eos appended, as TRL does: ".</s>"
        return tokenizer("." + tokenizer.eos_token, add_special_tokens=False)["input_ids"]

    if eos_ids()[-1:] == [tokenizer.eos_token_id]:
        return
    if getattr(tokenizer, "split_special_tokens", False):
        tokenizer.split_special_tokens = False
        log.info("tokenizer splits special tokens in text: turned off, so the %r appended to answers is read as the "
                 "eos token", tokenizer.eos_token)
        if eos_ids()[-1:] == [tokenizer.eos_token_id]:
            return
    raise UserError(
        f"model: tokenizer of {path!r} reads '.{tokenizer.eos_token}' as {eos_ids()}, not ending with the eos id "
        f"{tokenizer.eos_token_id}; answers would be trained without their end. Register its eos token as a special "
        "token in its tokenizer files"
    )


def _plain_cpu_4bit(model) -> None:
    """bitsandbytes 0.50 repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first eval-mode, no-grad
    forward, and that fails when the layer's input size is not a multiple of the quantisation block (64): the toy's
    MLP down projection (352 inputs) raises a shape error. Keep the generic 4-bit path (the one training uses)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


PROMPT_ENCODER_FILE = "prompt_encoder.safetensors"  # P-tuning / prefix projection: the encoder, beside peft's folder


def has_prompt_encoder(config) -> bool:
    """P-tuning, or prefix tuning with a projection: the virtual tokens come out of a trained encoder."""
    return config.peft_type == "P_TUNING" or bool(getattr(config, "prefix_projection", False))


def real_token_logits(logits, input_ids):
    """``logits`` at the positions of ``input_ids``' own tokens. peft's prompt tuning and P-tuning prepend their
    virtual tokens to the sequence the model returns logits for (``num_virtual_tokens`` more positions, first);
    prefix tuning and every other method return one position per input token, which this leaves as they are."""
    extra = logits.shape[1] - input_ids.shape[1]
    return logits[:, extra:] if extra > 0 else logits


class SharedPolicy:
    """One base model; named adapters on it. ``model`` is the PeftModel once an adapter exists, else the base."""

    def __init__(self, base, tokenizer, model_path: str):
        self.base = base
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.model = base
        self.frozen: set[str] = set()
        self.extra_trainable: dict[str, list] = {}  # adapter -> parameters outside peft trained with it (MAM modules)

    @classmethod
    def load(cls, model_ref: str, dtype: str = "auto", trust_remote_code: bool = False,
             quantization=None, allow_pickle: bool = False) -> SharedPolicy:
        """``quantization``: a transformers quantisation config (QLoRA's 4-bit NF4), or None."""
        from transformers import AutoModelForCausalLM

        path = resolve_model_path(model_ref)
        quantized = {} if quantization is None else {
            "quantization_config": quantization, "device_map": "cuda" if torch.cuda.is_available() else "cpu"}
        try:
            tokenizer = load_tokenizer(path, trust_remote_code)
            base = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **quantized,
                use_safetensors=None if allow_pickle else True,  # pickle weights only when the config allows them
            )
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"model: cannot load {model_ref!r} ({first}); use `toy`, a local model folder, or a hub id that is "
                "already in the local Hugging Face cache"
            ) from None
        if quantization is not None:
            _plain_cpu_4bit(base)
        if torch.cuda.is_available() and quantization is None:
            base = base.to("cuda")
        base.config.use_cache = True
        _say_stop_ids(tokenizer, base)
        return cls(base, tokenizer, path)

    # ----------------------------------------------------------------------------------------- adapters

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}) or {})

    def add_adapter(self, name: str, cfg: MethodOptions) -> None:
        """A fresh, trainable peft adapter called ``name`` (replacing one of that name), made active."""
        from alignment.methods import PeftMethod, method_for

        method = method_for(cfg)
        if not isinstance(method, PeftMethod):
            raise UserError(f"adapter.method: {cfg.method!r} is not a peft adapter; this stage needs one "
                            "(see `alignment methods` for the stages each method supports)")
        method.prepare(self, name)

    def attach(self, name: str, peft_config, state: dict | None = None, trainable: bool = False) -> None:
        """Add adapter ``name`` from a peft config (replacing one of that name), with weights ``state`` if given."""
        from peft import get_peft_model, set_peft_model_state_dict

        if name in self.adapters:
            self.delete_adapter(name)
        if self.model is self.base:
            self.model = get_peft_model(self.base, peft_config, adapter_name=name)
        else:
            self.model.add_adapter(name, peft_config)
        if state is not None:
            set_peft_model_state_dict(self.model, state, adapter_name=name)
        (self.frozen.discard if trainable else self.frozen.add)(name)
        self._apply_trainability()

    def load_adapter(self, name: str, path: Path, trainable: bool = False) -> None:
        """Load a stock peft adapter folder as ``name`` (replacing one of that name)."""
        from peft import PeftModel

        path = Path(path)
        self.check_adapter_base(path)
        if trainable and self._load_prompt_learning(name, path):
            return
        if name in self.adapters:
            self.delete_adapter(name)
        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=trainable)
        else:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
        if trainable:
            self.frozen.discard(name)
        else:
            self.frozen.add(name)
        self.activate(name, trainable=trainable)

    def _load_prompt_learning(self, name: str, path: Path) -> bool:
        """peft refuses to load a saved prompt-learning adapter as trainable; its saved virtual tokens put into a
        fresh trainable adapter of the same config are the same adapter (prefix and prompt tuning: what peft saves
        is the trained embedding itself). P-tuning and prefix tuning with a projection are saved by peft as the
        virtual tokens their encoder computed: ``save_adapter`` writes the encoder beside them
        (``prompt_encoder.safetensors``), which is loaded here. False when the folder is not prompt learning."""
        from peft import PeftConfig
        from safetensors.torch import load_file

        config = PeftConfig.from_pretrained(str(path))
        if not config.is_prompt_learning:
            return False
        config.inference_mode = False
        if has_prompt_encoder(config):
            if not (path / PROMPT_ENCODER_FILE).is_file():
                raise UserError(f"{path}: peft saves this {config.peft_type} adapter as its computed virtual tokens, "
                                "not the prompt encoder that produced them, and the folder has no "
                                f"{PROMPT_ENCODER_FILE} (the encoder, written by this framework's save), so it cannot "
                                "be trained further; retrain it, or use prefix tuning without `projection`, or prompt "
                                "tuning")
            from alignment.safety import check_safetensors

            check_safetensors(path / PROMPT_ENCODER_FILE, "prompt encoder weights")
            self.attach(name, config, trainable=True)
            self.model.prompt_encoder[name].load_state_dict(load_file(str(path / PROMPT_ENCODER_FILE)))
        else:
            self.attach(name, config, load_file(str(path / "adapter_model.safetensors")), trainable=True)
        self.activate(name, trainable=True)
        return True

    def save_adapter(self, name: str, path: Path) -> None:
        """Write adapter ``name`` as a stock peft folder at ``path`` (atomically: temp folder, then rename)."""
        from alignment.io import atomic_dir

        with atomic_dir(Path(path)) as tmp:
            self.model.save_pretrained(str(tmp / "saved"), selected_adapters=[name])
            saved = tmp / "saved" / name if (tmp / "saved" / name).is_dir() else tmp / "saved"  # peft nests non-default
            for f in saved.iterdir():
                if f.is_file():
                    shutil.move(str(f), tmp / f.name)
            shutil.rmtree(tmp / "saved")
            if has_prompt_encoder(self.model.peft_config[name]):  # peft saves only what the encoder computed
                from safetensors.torch import save_file

                encoder = self.model.prompt_encoder[name].state_dict()
                save_file({k: v.detach().contiguous() for k, v in encoder.items()}, str(tmp / PROMPT_ENCODER_FILE))
            config_file = tmp / "adapter_config.json"
            config = json.loads(config_file.read_text())
            config["base_model_name_or_path"] = self.model_path
            config["inference_mode"] = True
            config_file.write_text(json.dumps(config, indent=2))

    def delete_adapter(self, name: str) -> None:
        if name in self.adapters:
            if len(self.adapters) == 1 and self.model.peft_config[name].is_prompt_learning:
                self.model = self.base  # prompt learning never changed the base's modules
            elif len(self.adapters) == 1:  # peft cannot delete its last adapter: unwrap instead
                self.model = self.base = self.model.unload()
            else:
                if self.model.active_adapter == name:
                    other = next(a for a in self.adapters if a != name)
                    self.model.set_adapter(other)
                self.model.delete_adapter(name)
        self.frozen.discard(name)
        self.extra_trainable.pop(name, None)

    def restore_base(self) -> None:
        """The base's weights as loaded from ``model_path`` again, all frozen (after a stage trained them in place)."""
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.base.dtype)
        self.base.load_state_dict(fresh.state_dict())
        self.base.requires_grad_(False)

    def freeze_copy(self, source: str, name: str) -> None:
        """A frozen copy of adapter ``source`` called ``name`` (e.g. the reference from the SFT policy)."""
        from peft import get_peft_model_state_dict

        config = copy.deepcopy(self.model.peft_config[source])
        config.inference_mode = True
        self.attach(name, config, get_peft_model_state_dict(self.model, adapter_name=source), trainable=False)

    def activate(self, name: str, trainable: bool | None = None) -> None:
        """Make ``name`` the active adapter. Only non-frozen adapters ever get gradients."""
        if trainable is not None and not trainable:
            self.frozen.add(name)
        elif trainable:
            self.frozen.discard(name)
        self.model.set_adapter(name)
        self._apply_trainability()

    def _apply_trainability(self) -> None:
        active = getattr(self.model, "active_adapter", None)
        names = set(self.adapters)
        for param_name, param in self.model.named_parameters():
            owner = next((part for part in param_name.split(".") if part in names), None)
            param.requires_grad_(owner is not None and owner == active and owner not in self.frozen)
        for owner, params in self.extra_trainable.items():
            for param in params:
                param.requires_grad_(owner == active and owner not in self.frozen)

    @contextlib.contextmanager
    def using(self, name: str):
        """Adapter ``name`` active inside the block; the previous one (and trainability) restored after."""
        previous = getattr(self.model, "active_adapter", None)
        self.activate(name)
        try:
            with mixed_precision(self.base):
                yield self.model
        finally:
            if previous is not None and previous in self.adapters:
                self.activate(previous)

    def backbone(self):
        """The transformer body (no LM head) with the active adapter applied: hidden states for score heads. Called
        directly it bypasses what peft's own forward adds for prompt learning (virtual tokens, prefixes): reward
        models of those methods read their hidden states through that forward (``reward_models.trained``)."""
        causal = self.model.get_base_model() if self.model is not self.base else self.base
        return getattr(causal, causal.base_model_prefix)

    def checkpointing(self, on: bool = True):
        """Gradient checkpointing on the shared base inside the block (see ``gradient_checkpointing``)."""
        return gradient_checkpointing([self.base], on)

    @contextlib.contextmanager
    def disabled(self):
        """The bare base model (no adapter) inside the block."""
        if self.model is self.base:
            yield self.base
        else:
            with self.model.disable_adapter():
                yield self.model

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters of adapter ``name`` (those named ``....<name>....`` by peft, plus its extra ones)."""
        own = [p for n, p in self.model.named_parameters() if f".{name}." in n]
        return own + [p for p in self.extra_trainable.get(name, []) if all(p is not q for q in own)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()}

    def check_adapter_base(self, path: Path) -> None:
        """UserError when the adapter folder records a base other than this policy's."""
        from alignment.safety import check_adapter_folder

        config_file = path / "adapter_config.json"
        if not config_file.exists():
            raise UserError(f"{path}: not a peft adapter folder (no adapter_config.json)")
        check_adapter_folder(path)
        recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
        if recorded and Path(recorded).exists() and Path(self.model_path).exists():
            if Path(recorded).resolve() != Path(self.model_path).resolve():
                raise UserError(
                    f"{config_file}: adapter was trained on base {recorded!r}, not the configured model "
                    f"{self.model_path!r}; set `model:` to that base or retrain the adapter"
                )
        elif recorded and recorded != self.model_path and not Path(recorded).exists():
            raise UserError(
                f"{config_file}: adapter was trained on base {recorded!r}, not the configured model "
                f"{self.model_path!r}; set `model:` to that base or retrain the adapter"
            )


def _through_prefixes(model, inner):
    """``inner`` (the body) called through peft's full forward: peft puts prefix tuning's prefixes in as the
    layers' key/value cache in its own forward, which the bare body never sees. The body's output is kept; the LM
    head computes one position only."""

    def forward(**kwargs):
        kept = []
        hook = inner.register_forward_hook(lambda module, args, output: kept.append(output))
        try:
            model(**kwargs, logits_to_keep=1)
        finally:
            hook.remove()
        return kept[-1]

    return forward


class PrefixedReference(torch.nn.Module):
    """A frozen peft prefix-tuning model (MAM's DPO/KTO reference, on a copy of the base of its own) in the shape
    TRL's fused log-prob head patches (``trl.trainer.utils.add_fused_lm_head``): that head calls the model's
    ``base_model`` for the body's hidden states. On a PeftModel TRL did not wrap, ``base_model`` is the causal LM
    (measured: "'CausalLMOutputWithPast' object has no attribute 'last_hidden_state'"), and the bare body would skip
    the prefixes; here it is the body run through peft's forward (``_through_prefixes``)."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        self.config = peft_model.get_base_model().config

    def forward(self, *args, **kwargs):
        return self.peft_model(*args, **kwargs)

    def base_model(self, **kwargs):
        causal = self.peft_model.get_base_model()
        return _through_prefixes(self.peft_model, getattr(causal, causal.base_model_prefix))(**kwargs)

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()

    @property
    def device(self):
        return self.peft_model.device

    @property
    def dtype(self):
        return self.peft_model.get_base_model().dtype


def mixed_precision(model):
    """Autocast to the model's half-precision dtype (bf16, fp16) inside the block, as transformers' Trainer does for
    TRL's stages. peft keeps adapter weights in float32 beside a half-precision base, so without it every adapter
    matmul casts its activations up to float32 and back (forward + backward of the 76M bench model with LoRA r=16 in
    bf16 on CPU: 25-30 % slower, docs/benchmarks.md). The trained weights stay float32; nothing changes in float32
    or on a quantised (4-bit) base."""
    dtype = getattr(model, "dtype", torch.float32)
    if dtype not in (torch.bfloat16, torch.float16) or getattr(model, "is_loaded_in_4bit", False):
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=dtype)


@contextlib.contextmanager
def gradient_checkpointing(models, on: bool = True):
    """Gradient checkpointing for the forwards run inside the block (and their backward, which must run inside it
    too): each decoder layer keeps its input and recomputes the rest in backward. Off outside the block, so generation
    and no-grad passes keep their KV cache. Only the decoder layers are put in training mode (that is what transformers
    checks before checkpointing), so dropout stays as it is. ``on=False`` turns off what a trainer earlier in the
    process may have turned on (TRL enables it on the shared base), so a loop that puts the whole model in training
    mode does not checkpoint unasked."""
    if not on:
        for model in models:
            if getattr(model, "is_gradient_checkpointing", False):
                model.gradient_checkpointing_disable()
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = []
    for model in models:
        own = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not own:
            raise UserError(f"gradient_checkpointing: {type(model).__name__} has no checkpointable layers "
                            "(transformers' GradientCheckpointingLayer); set `gradient_checkpointing: false`")
        if not getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers += own
    modes = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.training = mode
