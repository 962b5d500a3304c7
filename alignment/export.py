"""``alignment export`` and ``alignment generate``: the final policy of a run, outside the pipeline.

The final policy is the `policy` artifact of the last stage that produced one (summary.json). A LoRA policy is a
stock peft folder; ``--merge`` folds it into the base weights and writes a plain transformers model folder
(safetensors + tokenizer + generation config) that ``AutoModelForCausalLM`` and vLLM load as is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from alignment.errors import UserError
from alignment.io import atomic_dir, read_json


def final_policy(run_dir: Path) -> tuple[str, Path]:
    """(base model reference, folder of the final `policy` artifact) of a run folder."""
    summary_file = Path(run_dir) / "summary.json"
    if not summary_file.is_file():
        raise UserError(f"{run_dir}: not a run folder (no summary.json); pass runs/<name>")
    summary = read_json(summary_file)
    for stage in reversed(summary["stages"]):
        if "policy" in stage.get("artifacts", {}) and stage.get("status") in ("done", "skipped"):
            folder = Path(run_dir) / stage["artifacts"]["policy"]
            if not folder.is_dir():
                raise UserError(f"{folder}: the final policy named in summary.json is missing; re-run the pipeline")
            return summary["model"], folder
    raise UserError(f"{run_dir}: no finished stage produced a `policy`")


def _is_full_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()


def _module_method(folder: Path):
    """The ``Method`` of a bottleneck / MAM policy folder (our modules, recorded in method.json), else None."""
    from alignment.methods import BOTTLENECK_FILE, OPTION_CLASSES, method_for

    if not (folder / BOTTLENECK_FILE).is_file() or not (folder / "method.json").is_file():
        return None
    options = read_json(folder / "method.json")
    options.pop("base", None)
    return method_for(OPTION_CLASSES[options["method"]](**options))


def export(run_dir: Path, out: Path, merge: bool) -> Path:
    """Write the run's final policy to ``out``: the peft adapter folder, or with ``merge`` a plain model folder."""
    from alignment.policy import load_tokenizer, resolve_model_path
    from alignment.rollout import stop_token_ids

    model_ref, folder = final_policy(run_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new folder")
    module = _module_method(folder)
    if merge and module is not None:
        raise UserError(f"{folder}: a {module.name} policy has bottleneck modules (down, nonlinearity, up), which "
                        "cannot be merged into the base's linear weights; export the folder with --out (`alignment "
                        "generate` samples from it on the HF engine)")
    if not merge or _is_full_model(folder):  # a fully fine-tuned policy is already a plain model folder
        with atomic_dir(out) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path = resolve_model_path(model_ref)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    tokenizer = load_tokenizer(base_path)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    stop = stop_token_ids(tokenizer, merged)  # every eos id the run's engines stopped on, not only the tokenizer's
    merged.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


class Generator:
    """Samples from a run's final policy (or a model folder / hub id) through our rollout engines; loads once."""

    def __init__(self, source: str, engine: str = "hf"):
        from alignment.policy import SharedPolicy

        path = Path(source)
        model_ref, adapter = final_policy(path) if (path / "summary.json").is_file() else (source, None)
        if adapter is not None and _is_full_model(adapter):
            model_ref, adapter = str(adapter), None
        self.model_ref = model_ref
        module = _module_method(adapter) if adapter is not None else None
        if module is not None:  # bottleneck / MAM: our modules hooked into the base, HF engine only
            if engine == "vllm":
                raise UserError(f"{adapter}: a {module.name} policy runs on the HF engine only (vLLM knows no "
                                "bottleneck modules); use --engine hf")
            self.policy = SharedPolicy.load(model_ref)
            module.load(self.policy, "policy", adapter)
            if "policy" not in self.policy.adapters:  # bottleneck alone: the engine samples a `policy` adapter
                from alignment.config import AdapterConfig

                self.policy.add_adapter("policy", AdapterConfig(r=8))  # LoRA B is zero: outputs are the model's
        elif adapter is None:  # our engines sample the `policy` adapter: give a plain model an empty (zero) one
            from alignment.config import AdapterConfig

            self.policy = SharedPolicy.load(model_ref)
            self.policy.add_adapter("policy", AdapterConfig(r=8))  # LoRA B starts at zero: outputs are the model's
        else:
            self.policy = SharedPolicy.load(model_ref)
            self.policy.load_adapter("policy", adapter)
        self.engine = None
        if engine == "vllm":
            from alignment.rollout.vllm import VLLMEngine

            rank = self.policy.model.peft_config["policy"].r
            self.engine = VLLMEngine(self.policy, "merged", 0.3, rank, 1024, 0)
        else:
            from alignment.rollout.hf import HFEngine

            self.engine = HFEngine(self.policy)

    def __call__(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        from alignment.rollout import Sampling

        return self.engine.generate(prompts, Sampling(max_new_tokens, temperature)).texts

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()
