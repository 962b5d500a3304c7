"""A trained reward model: a linear score head on the last token's hidden state + a LoRA adapter.

On disk it is a stock peft folder for sequence classification (``task_type: SEQ_CLS``, the head saved as
``base_model.model.score.weight``), so ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)``
plus ``PeftModel.from_pretrained(model, folder)`` gives the same scores. In the pipeline it lives on the shared
base as a named adapter (default ``reward``): no second copy of the base. The adapter may be any of the LoRA family
(rsLoRA and DoRA flags are kept). A reward model trained with a base-weight method (full, freeze, ...) is a plain
model folder with the head in ``score/`` (``save_base_reward_model``; with bottleneck modules the folder holds the
modules as the SFT artifact does, ``bottleneck.safetensors`` + ``method.json``, instead of the model's weights,
and with MAM its prefix adapter's stock peft files beside them, as in its SFT folder; with IA3 or prompt learning
(prefix, prompt, P-tuning), which peft cannot hold beside the LoRA policy, its stock peft folder in ``adapter/``,
P-tuning's and the prefix projection's encoder beside it as for a policy);
``TrainedRewardModel.load`` holds it as a separate frozen model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from alignment.errors import UserError
from alignment.policy import mixed_precision

SCORE_KEY = "base_model.model.score.weight"
STATS_FILE = "reward_stats.json"


def new_score_head(hidden_size: int, dtype: torch.dtype, device) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden_size, 1, bias=False, dtype=dtype, device=device)
    torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden_size + 1))
    return head


def sequence_rewards(policy, adapter_name: str, head, texts: list[str], max_length: int) -> torch.Tensor:
    """(B,) rewards: the head applied to the hidden state of each text's last token, with ``adapter_name`` active."""
    tokenizer = policy.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    batch = batch.to(head.weight.device)
    with policy.using(adapter_name) if adapter_name else mixed_precision(policy.base):  # None: a plain model
        if _prompt_learning(policy.model):
            hidden = _prompted_hidden(policy, batch)
        else:
            hidden = policy.backbone()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       use_cache=False).last_hidden_state
    last = batch["attention_mask"].sum(dim=1) - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(pooled).squeeze(-1).float()


def _prompt_learning(model) -> bool:
    """The model's active adapter is prompt learning (prefix, prompt, P-tuning: a reward model on its own copy)."""
    config = (getattr(model, "peft_config", None) or {}).get(getattr(model, "active_adapter", None))
    return bool(config is not None and config.is_prompt_learning)


def _prompted_hidden(policy, batch) -> torch.Tensor:
    """(B, T, H) final hidden states at the real tokens' positions, through peft's own forward: the virtual tokens
    (prompt tuning, P-tuning) and the prefixes are put in by ``PeftModel.forward``, which calling the backbone
    directly would bypass. The backbone's output is taken by a forward hook inside that forward (the LM head computes
    one position only, ``logits_to_keep=1``); prompt tuning and P-tuning put ``num_virtual_tokens`` positions first,
    dropped here (prefix tuning adds none)."""
    captured = []
    hook = policy.backbone().register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                     logits_to_keep=1)
    finally:
        hook.remove()
    hidden = captured[-1]
    return hidden[:, hidden.shape[1] - batch["input_ids"].shape[1]:]


def save_reward_model(policy, adapter_name: str, head, folder: Path, stats: dict) -> None:
    """Write the adapter + head as a stock SEQ_CLS peft folder (atomically: temp folder, then rename)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from alignment.io import atomic_dir

    with atomic_dir(Path(folder)) as tmp:
        state = get_peft_model_state_dict(policy.model, adapter_name=adapter_name)
        state = {k: v.detach().contiguous() for k, v in state.items()}
        state[SCORE_KEY] = head.weight.detach().clone().contiguous()
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = policy.model.peft_config[adapter_name].to_dict()
        config.update(
            task_type="SEQ_CLS",
            modules_to_save=["score"],
            base_model_name_or_path=policy.model_path,
            inference_mode=True,
            target_modules=sorted(config["target_modules"]) if config.get("target_modules") else None,
        )
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, default=list))
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2))


BASE_SCORE_FILE = "score/score.safetensors"  # outside the model folder's top level, where its weights are globbed
PEFT_FOLDER = "adapter"  # an IA3 / prompt-learning reward model: its stock peft adapter folder (on the recorded base)


def save_base_reward_model(policy, head, folder: Path, stats: dict, options) -> None:
    """A reward model on a copy of the base of its own: for a method that trained base weights (full, freeze, ...) a
    plain model folder, for bottleneck modules the modules (``BottleneckMethod.save_modules``; MAM: with its prefix
    adapter's peft files beside them); the score head in ``score/``, for IA3 or prompt learning its stock peft
    adapter in ``adapter/``; the method and base in ``method.json`` (atomically)."""
    from safetensors.torch import save_file

    from alignment.io import atomic_dir
    from alignment.methods import BottleneckMethod, MamMethod, method_for

    method = method_for(options)
    with atomic_dir(Path(folder)) as tmp:
        if isinstance(method, BottleneckMethod):
            method.save_modules(policy, tmp)
            if isinstance(method, MamMethod):  # its prefix adapter beside the modules, as in its SFT folder
                policy.save_adapter(policy.adapters[0], tmp / PEFT_FOLDER)
                for f in (tmp / PEFT_FOLDER).iterdir():
                    shutil.move(str(f), tmp / f.name)
                (tmp / PEFT_FOLDER).rmdir()
        elif policy.adapters:  # IA3: the stock peft adapter (CAUSAL_LM) of the copy, in a folder of its own
            policy.save_adapter(policy.adapters[0], tmp / PEFT_FOLDER)
        else:
            policy.base.save_pretrained(tmp, safe_serialization=True)
            policy.tokenizer.save_pretrained(tmp)
        (tmp / "score").mkdir()
        save_file({SCORE_KEY: head.weight.detach().clone().contiguous()}, str(tmp / BASE_SCORE_FILE))
        (tmp / "method.json").write_text(json.dumps({**options.model_dump(), "base": policy.model_path}))
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2))


def load_base_reward_model(cls, folder: Path, policy, adapter_name: str, **kwargs):
    """A ``save_base_reward_model`` folder as a separate frozen model (it cannot sit on the shared base)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from alignment.methods import BOTTLENECK_FILE, OPTION_CLASSES, method_for, parameter_bytes
    from alignment.metrics import console
    from alignment.policy import SharedPolicy, load_tokenizer

    recorded = json.loads((folder / "method.json").read_text()).get("base")
    if policy is not None and recorded and Path(recorded).exists() and Path(policy.model_path).exists() \
            and Path(recorded).resolve() != Path(policy.model_path).resolve():
        raise UserError(f"{folder / 'method.json'}: reward model was trained on base {recorded!r}, not the configured "
                        f"model {policy.model_path!r}; set `model:` to that base or retrain the reward model")
    dtype = policy.base.dtype if policy is not None else torch.float32
    peft = (folder / PEFT_FOLDER / "adapter_config.json").exists()  # IA3 or prompt learning on the base
    modules = peft or (folder / BOTTLENECK_FILE).exists()  # bottleneck modules on the base, not a model folder
    base_path = (policy.model_path if policy is not None else recorded) if modules else str(folder)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    if policy is not None:
        model = model.to(policy.base.device)
    model.requires_grad_(False)
    model.eval()
    tokenizer = policy.tokenizer if policy is not None else load_tokenizer(base_path)
    own = SharedPolicy(model, tokenizer, recorded or str(folder))
    if peft:
        own.load_adapter(adapter_name, folder / PEFT_FOLDER)  # frozen, active: the backbone (IA3) or peft's forward
        # (prompt learning: sequence_rewards) applies it
        model.eval()
    elif modules:
        options = json.loads((folder / "method.json").read_text())
        options.pop("base", None)
        method_for(OPTION_CLASSES[options["method"]](**options)).load(own, adapter_name, folder)  # frozen
        model.eval()
    head_weight = load_file(str(folder / BASE_SCORE_FILE))[SCORE_KEY]
    head = torch.nn.Linear(head_weight.shape[1], 1, bias=False, dtype=head_weight.dtype)
    head.weight.data.copy_(head_weight)
    head.requires_grad_(False)
    stats_file = folder / STATS_FILE
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    peft_type = json.loads((folder / PEFT_FOLDER / "adapter_config.json").read_text())["peft_type"] if peft else ""
    what = f"a {peft_type} adapter on the base" if peft else "MAM's prefixes and modules on the base" if own.adapters \
        else "bottleneck modules on the base" if modules else "trained base weights"
    console.print(f"reward model {folder.name}: {what}; held as a separate frozen model "
                  f"(+{parameter_bytes(model) / 2**20:.1f} MiB)")
    return cls(own, None, head.to(model.device), stats=stats, **kwargs)


class TrainedRewardModel:
    """Scores with a reward adapter + head on a SharedPolicy (the pipeline's, or one loaded for it)."""

    def __init__(self, policy, adapter_name: str, head, max_length: int = 512, batch_size: int = 64, stats=None):
        self.policy, self.adapter_name, self.head = policy, adapter_name, head
        self.max_length, self.batch_size = max_length, batch_size
        self.stats = stats or {}

    @classmethod
    def load(cls, folder: str | Path, policy=None, adapter_name: str = "reward", **kwargs) -> TrainedRewardModel:
        """From a reward folder; on ``policy``'s base when given (checked), else on the base the folder records."""
        from peft import LoraConfig
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        if (folder / BASE_SCORE_FILE).exists():
            return load_base_reward_model(cls, folder, policy, adapter_name, **kwargs)
        config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_file.exists() or not weights_file.exists():
            raise UserError(f"{folder}: not a reward model folder (needs adapter_config.json and adapter_model.safetensors)")
        config = json.loads(config_file.read_text())
        if policy is None:
            from alignment.policy import SharedPolicy

            policy = SharedPolicy.load(config["base_model_name_or_path"])
        policy.check_adapter_base(folder)
        try:
            state = load_file(str(weights_file))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{weights_file}: corrupted or unreadable safetensors file ({e}); retrain or re-copy it") from None
        if SCORE_KEY not in state:
            raise UserError(f"{weights_file}: has no score head ({SCORE_KEY}); is this a reward model folder?")
        head_weight = state.pop(SCORE_KEY)
        lora = LoraConfig(
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            lora_dropout=0.0,
            target_modules=config["target_modules"],
            task_type="CAUSAL_LM",
            inference_mode=True,
            use_rslora=bool(config.get("use_rslora", False)),  # the reward stage trains any LoRA-typed method
            use_dora=bool(config.get("use_dora", False)),
        )
        policy.attach(adapter_name, lora, state, trainable=False)
        head = torch.nn.Linear(head_weight.shape[1], 1, bias=False, dtype=head_weight.dtype)
        head.weight.data.copy_(head_weight)
        head.requires_grad_(False)
        stats_file = folder / STATS_FILE
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        return cls(policy, adapter_name, head.to(policy.base.device), stats=stats, **kwargs)

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """(B,) rewards of ``prompt + completion``; a prompt too long for ``max_length`` with its completion is cut from
        the left (its start token and most recent text kept: alignment/truncation.py), never the completion (one
        longer than ``max_length`` on its own is scored on its first ``max_length`` tokens, after an empty prompt)."""
        from alignment.truncation import PromptFitter

        fitted = PromptFitter(self.policy.tokenizer, self.max_length, eos=False).fit(
            list(prompts), [[c] for c in completions])
        texts = [(f.prompt if f.prompt is not None else "") + c for f, c in zip(fitted, completions)]
        out = [
            sequence_rewards(self.policy, self.adapter_name, self.head, texts[i : i + self.batch_size], self.max_length)
            for i in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(out).cpu() if out else torch.zeros(0)
