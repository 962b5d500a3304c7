"""AdapterFusion over peft LoRA layers (Pfeiffer et al., 2021), our own module.

Knowledge extraction trains one LoRA adapter per task; knowledge composition (this module) freezes them and learns,
per transformer layer, an attention over the adapters' outputs that every LoRA layer (adapted linear module) in it
uses, at each token:

    out = W x + sum_i softmax_i( (W_q q) . (W_k a_i(x)) / sqrt(d) ) V(a_i(x)),    a_i(x) = B_i A_i x * scaling_i

What the query ``q`` is:

- ``query="token"`` (Pfeiffer's): the transformer layer's input hidden state at that token.
- ``query="prompt"``: the base model's last hidden state at the last prompt token, one per sequence (a first,
  adapter-free pass over the prompt computes it; generated tokens keep it). Every layer still has its own attention.
  On the toy, token queries cannot work: the adapters' first-layer outputs at the review's words decide the answer,
  and those inputs are the bare words, identical whichever question is asked (routing every other layer perfectly
  and only those by chance drops accuracy to about 0.5). A prompt query sees the question; it is the default.

While ``applied`` is active, peft's own LoRA sum is switched off on the fused layers and a forward hook adds the
fused output instead; leaving the block restores peft's behaviour. ``V`` is the identity unless ``learn_value``
(then it starts as the identity), so a fusion over a single adapter reproduces that adapter exactly.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from alignment.algorithms.fusion import fusion_attention
from alignment.errors import UserError

FUSION_WEIGHTS = "fusion.safetensors"
FUSION_CONFIG = "fusion.json"


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)


class FusionLayer(nn.Module):
    """One transformer layer's fusion, shared by the LoRA layers (adapted linear modules) inside it.

    The query projection reads the query source (the layer's input hidden state, or the prompt state). Keys are
    projected from each module's adapter outputs (token queries, Pfeiffer's) or are one learned key per adapter
    (prompt queries: the query is per sequence, so per-token keys only add noise). Values are the adapters' outputs,
    or (``learn_value``) a per-module projection of them that starts as the identity.
    """

    def __init__(self, hidden: int, dim: int, n_adapters: int, modules: dict[str, int], learned_keys: bool, learn_value: bool):
        super().__init__()
        # torch's default init (scale 1/sqrt(fan_in)): scores differ between adapters from the start, so the
        # projections get gradients (near-zero init sits at the uniform attention and learns slowly)
        self.query = nn.Linear(hidden, dim, bias=False)
        self.adapter_keys = None
        if learned_keys:
            # prompt queries: start at the uniform mix (zero queries) with orthonormal keys, so learning the routing
            # starts as a logistic regression from the prompt state onto fixed, distinct adapter directions
            nn.init.zeros_(self.query.weight)
            keys = torch.linalg.qr(torch.randn(max(dim, n_adapters), n_adapters))[0][:dim].T if dim >= n_adapters else torch.randn(n_adapters, dim)
            self.adapter_keys = nn.Parameter(keys.contiguous() * dim**0.5)
        self.key = None if learned_keys else nn.ModuleDict({k: nn.Linear(out, dim, bias=False) for k, out in modules.items()})
        self.value = None
        if learn_value:
            self.value = nn.ModuleDict({k: nn.Linear(out, out, bias=False) for k, out in modules.items()})
            with torch.no_grad():
                for layer in self.value.values():
                    layer.weight.copy_(torch.eye(layer.weight.shape[0]))

    def forward(self, module: str, query_source: torch.Tensor, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query_source (..., hidden), outputs (..., n, out) of LoRA layer ``module`` -> fused (..., out), weights (..., n)."""
        values = self.value[module](outputs) if self.value is not None else outputs
        if self.key is None:  # prompt queries arrive standardised
            keys = self.adapter_keys.to(outputs.dtype).expand(*outputs.shape[:-1], -1)
            return fusion_attention(self.query(query_source), keys, values)
        # RMS-normalised inputs: adapter outputs are small and differ in scale between layers
        return fusion_attention(self.query(_rms(query_source)), self.key[module](_rms(outputs)), values)


def _layer_of(name: str) -> str:
    """The transformer layer a module belongs to (``...layers.3.self_attn.q_proj`` -> ``...layers.3``)."""
    match = re.match(r"(.*\.layers\.\d+)\.", name)
    return match.group(1) if match else name


class AdapterFusion(nn.Module):
    """A fusion per transformer layer over every LoRA layer of ``peft_model`` that holds all of ``adapters``."""

    def __init__(self, peft_model, adapters: list[str], dim: int = 32, learn_value: bool = False, query: str = "prompt"):
        super().__init__()
        from peft.tuners.lora import LoraLayer

        if not adapters:
            raise UserError("adapter_fusion: needs at least one task adapter to fuse")
        if query not in ("prompt", "token"):
            raise UserError(f"adapter_fusion.query: {query!r} is not `prompt` or `token`")
        self.adapters, self.dim, self.learn_value, self.query = list(adapters), dim, learn_value, query
        self.model = [peft_model]  # a list: the model is not our submodule (its weights are not the fusion's)
        hidden = peft_model.get_base_model().config.hidden_size
        groups: dict[str, dict[str, int]] = {}  # transformer layer -> {module key: out_features}
        self._targets: dict[str, tuple[nn.Module, str]] = {}  # module key -> (peft LoRA layer, its layer's key)
        named = dict(peft_model.named_modules())
        for name, module in named.items():
            if not isinstance(module, LoraLayer) or not isinstance(module.base_layer, nn.Linear):
                continue
            if not all(a in module.lora_A for a in self.adapters):
                continue
            variants = [a for a in self.adapters if a in getattr(module, "lora_variant", {})]
            if variants:
                raise UserError(f"adapter_fusion: adapter {variants[0]!r} is a LoRA variant (DoRA...); fuse plain LoRA adapters")
            layer_key = _layer_of(name).replace(".", "__")
            groups.setdefault(layer_key, {})[name.replace(".", "__")] = module.base_layer.out_features
            self._targets[name.replace(".", "__")] = (module, layer_key)
        if not groups:
            raise UserError(f"adapter_fusion: no LoRA layer holds all of the adapters {self.adapters}; were they loaded?")
        self.layers = nn.ModuleDict(
            {k: FusionLayer(hidden, dim, len(self.adapters), mods, query == "prompt", learn_value) for k, mods in groups.items()}
        )
        # token queries read each transformer layer's input hidden state (captured by a pre-hook on the layer)
        self._blocks = {k: named[k.replace("__", ".")] for k in groups if k.replace("__", ".") in named}
        self._layer_inputs: dict[str, torch.Tensor] = {}
        self.last_weights: dict[str, torch.Tensor] = {}
        self._prompt_state: torch.Tensor | None = None  # (batch, hidden), query="prompt"
        # prompt states share a large common part; queries see them standardised (statistics from `calibrate`)
        self.register_buffer("query_mean", torch.zeros(hidden))
        self.register_buffer("query_scale", torch.ones(hidden))
        self._routing = False
        self._active = False
        self.to(next(peft_model.parameters()).device)

    # ------------------------------------------------------------------------------------------- forward

    def _hook(self, key: str, module, args, output):
        if self._routing:
            return output  # the adapter-free pass that computes the prompt queries
        x = args[0]
        outputs = []
        for name in self.adapters:
            lora_A, lora_B = module.lora_A[name], module.lora_B[name]
            h = x.to(lora_A.weight.dtype)
            outputs.append(lora_B(lora_A(module.lora_dropout[name](h))) * module.scaling[name])
        layer_key = self._targets[key][1]
        layer = self.layers[layer_key]
        if self.query == "prompt":
            if self._prompt_state is None:
                raise RuntimeError("adapter fusion with prompt queries: call route() (or use FusedModel) first")
            source = self._prompt_state.reshape(x.shape[0], *([1] * (x.dim() - 2)), -1).expand(*x.shape[:-1], -1)
        else:
            source = self._layer_inputs.get(layer_key)
            if source is None or source.shape[:-1] != x.shape[:-1]:
                raise RuntimeError(f"adapter fusion with token queries: no input captured for layer {layer_key}")
        fused, weights = layer(key, source.to(layer.query.weight.dtype), torch.stack(outputs, dim=-2))
        self.last_weights[key] = weights if torch.is_grad_enabled() else weights.detach()  # kept for a routing loss
        return output + fused.to(output.dtype)

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """query="prompt": standardise prompt states with the mean and spread over ``batches`` of
        (input_ids, attention_mask, prompt_end), e.g. the fusion's training prompts."""
        if self.query != "prompt":
            return
        self.query_mean.zero_()
        self.query_scale.fill_(1.0)
        states = []
        for input_ids, attention_mask, prompt_end in batches:
            self.route(input_ids, attention_mask, prompt_end)
            states.append(self._prompt_state)
        states = torch.cat(states)
        self.query_mean.copy_(states.mean(0))
        self.query_scale.copy_(states.std(0).clamp(min=1e-4) if len(states) > 1 else torch.ones_like(self.query_mean))

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prompt_end: torch.Tensor) -> None:
        """query="prompt": the base model's last hidden state at each sequence's last prompt token (index
        ``prompt_end``), kept as the queries of the following fused forward passes. A no-op for token queries."""
        if self.query != "prompt":
            return
        model = self.model[0]
        with self.applied():
            self._routing = True
            try:
                was_training = model.training
                model.eval()
                hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
                model.train(was_training)
            finally:
                self._routing = False
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        state = hidden[rows, prompt_end.to(hidden.device)].float()
        self._prompt_state = (state - self.query_mean) / self.query_scale

    @contextlib.contextmanager
    def applied(self):
        """Inside the block the model computes base + fused adapter outputs on every fused layer (re-entrant)."""
        if self._active:
            yield self
            return
        handles, disabled = [], {}
        self._active = True
        try:
            for key, (module, _) in self._targets.items():
                disabled[key] = module._disable_adapters
                module._disable_adapters = True  # peft adds no LoRA output of its own; the hook adds ours
                handles.append(module.register_forward_hook(lambda m, a, o, key=key: self._hook(key, m, a, o)))
            if self.query == "token":
                for layer_key, block in self._blocks.items():
                    handles.append(block.register_forward_pre_hook(self._capture(layer_key), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for key, value in disabled.items():
                self._targets[key][0]._disable_adapters = value
            self._layer_inputs.clear()
            self._active = False

    def _capture(self, layer_key: str):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            self._layer_inputs[layer_key] = hidden
        return pre_hook

    def layer_weights(self) -> list[torch.Tensor]:
        """Each transformer layer's attention over the adapters in the last forward pass, one (batch, n) tensor per
        layer (prompt queries: the same at every token; token queries: averaged over the tokens). Keeps the graph."""
        out, seen = [], set()
        for key, weights in self.last_weights.items():
            layer = self._targets[key][1]
            if layer not in seen:
                seen.add(layer)
                out.append(weights.reshape(weights.shape[0], -1, weights.shape[-1]).mean(1))
        return out

    def mean_weights(self, last_token: bool = False) -> dict[str, float]:
        """Attention weight of each adapter in the last forward pass, averaged over the layers and the tokens (or,
        with ``last_token``, the last position of each sequence: where the answer is predicted, with left padding)."""
        if not self.last_weights:
            return {}
        n = len(self.adapters)
        stacked = torch.stack(
            [(w[..., -1, :] if last_token and w.dim() >= 3 else w).reshape(-1, n).mean(0) for w in self.last_weights.values()]
        )
        return {name: round(float(v), 4) for name, v in zip(self.adapters, stacked.mean(0))}

    # ------------------------------------------------------------------------------------------ save / load

    def save(self, folder: Path, sources: dict[str, str] | None = None) -> None:
        """``fusion.safetensors`` (the fusion layers) and ``fusion.json`` (adapters fused, in order, and settings)."""
        from safetensors.torch import save_file

        from alignment.io import atomic_dir

        with atomic_dir(Path(folder)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tmp / FUSION_WEIGHTS)
            config = {"adapters": self.adapters, "dim": self.dim, "learn_value": self.learn_value, "query": self.query,
                      "sources": sources or {}}
            (tmp / FUSION_CONFIG).write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, folder: Path, peft_model) -> AdapterFusion:
        """Rebuild the fusion over ``peft_model`` (which must already hold the fused adapters, by the same names)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / FUSION_CONFIG).read_text())
        fusion = cls(peft_model, config["adapters"], config["dim"], config["learn_value"], config.get("query", "prompt"))
        fusion.load_state_dict(load_file(folder / FUSION_WEIGHTS))
        return fusion


class FusedModel(nn.Module):
    """The fused model as evaluators call it: ``forward`` / ``generate`` route each sequence by its prompt first.

    ``forward(..., prompt_lengths=...)`` takes the prompt length of each (right-padded) row; without it the whole
    input is the prompt. ``generate`` takes left-padded prompts. Evaluators check ``routes_by_prompt``.
    """

    routes_by_prompt = True

    def __init__(self, fusion: AdapterFusion):
        super().__init__()
        self.fusion = fusion
        self.inner = fusion.model[0]

    @property
    def device(self):
        return next(self.inner.parameters()).device

    def forward(self, input_ids, attention_mask=None, prompt_lengths=None, **kwargs):
        if prompt_lengths is None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            prompt_end = mask.sum(1) - 1  # right padding: the last real token
        else:
            prompt_end = torch.as_tensor(prompt_lengths) - 1
        self.fusion.route(input_ids, attention_mask, prompt_end)
        with self.fusion.applied():
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        end = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1)  # left padding: the last column
        self.fusion.route(input_ids, attention_mask, end)
        with self.fusion.applied():
            return self.inner.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
