"""Stage kinds: built-ins as lazy import strings, plus ``kind: package.module:Class`` for user plugins.

Importing a stage module must be cheap (pydantic only); heavy imports live inside ``run``.
"""

from __future__ import annotations

import difflib
import importlib
import re

from alignment.errors import ConfigError

BUILTIN_STAGES: dict[str, str] = {
    "sft": "stages.sft:SFTStage",
    "reward": "stages.reward:RewardStage",
    "dpo": "stages.dpo:DPOStage",
    "ppo": "stages.ppo:PPOStage",
    "grpo": "stages.grpo:GRPOStage",
    "rloo": "stages.rloo:RLOOStage",
    "kto": "stages.kto:KTOStage",
    "orpo": "stages.orpo:ORPOStage",
    "ewc": "stages.ewc:EWCStage",
    "adapter_fusion": "stages.adapter_fusion:AdapterFusionStage",
    "multitask": "stages.multitask:MultitaskStage",
}


def resolve_kind(kind: object):
    """The stage class for ``kind``; raises ConfigError (with 'did you mean') when it cannot be found."""
    if not isinstance(kind, str) or not kind:
        raise ConfigError("kind", [f"must be a stage kind name, got {kind!r}"])
    target = BUILTIN_STAGES.get(kind)
    if target is None:
        if ":" not in kind:
            hint = difflib.get_close_matches(kind, list(BUILTIN_STAGES), n=1)
            known = ", ".join(sorted(BUILTIN_STAGES))
            msg = f"unknown stage kind {kind!r}" + (f"; did you mean {hint[0]!r}?" if hint else f" (known: {known})")
            raise ConfigError("kind", [msg + "; a plugin is written as package.module:Class"])
        target = kind
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError("kind", [f"cannot import stage module {module_name!r} ({e}); is it on PYTHONPATH?"]) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError("kind", [f"module {module_name!r} has no class {attr!r}"])
    missing = [a for a in ("Config", "requires", "produces", "run") if not hasattr(cls, a)]
    if missing:
        raise ConfigError("kind", [f"{target} is not a stage: it lacks {', '.join(missing)} (see docs/ARCHITECTURE.md)"])
    return cls


def describe_stages() -> list[tuple[str, str, dict[str, str]]]:
    """(kind, one-line description, {field: type and default}) for every built-in kind."""
    out = []
    for kind in BUILTIN_STAGES:
        cls = resolve_kind(kind)
        fields = {}
        for name, field in cls.Config.model_fields.items():
            if name == "kind":
                continue
            annotation = re.sub(r"\b(typing|alignment\.config)\.", "", repr(field.annotation)).replace("<class '", "")
            annotation = annotation.replace("'>", "")
            default = field.default_factory() if field.default_factory else field.default
            fields[name] = f"{annotation} = {default!r}"
        doc = (cls.__doc__ or "").strip().splitlines()
        out.append((kind, doc[0] if doc else "", fields))
    return out
