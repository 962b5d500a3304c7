"""Safe loading: safetensors only (pickle weights refused unless ``allow_pickle: true``), no model code executed
unless ``trust_remote_code: true``, corrupted safetensors files named instead of crashing deep in a loader.

Configs are read with ``yaml.safe_load`` (no Python tags), nothing in a config is ``eval``-ed, and plugin modules
(``kind: pkg.mod:Class``, ``reward: pkg.mod:function``) are imported only when a config names them.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignment.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def model_folder_problems(ref: str, allow_pickle: bool, trust_remote_code: bool) -> list[str]:
    """Problems of a local model folder, each as ``<field>: ...`` (hub ids are checked when loaded)."""
    path = Path(ref).expanduser()
    from alignment.toy import world_of

    if world_of(ref) is not None or not (path / "config.json").is_file():
        return []
    problems = []
    weights = [f for f in path.iterdir() if f.is_file()]
    has_safe = any(f.suffix == ".safetensors" for f in weights)
    pickles = sorted(f.name for f in weights if f.suffix in PICKLE_SUFFIXES and f.name != "training_args.bin")
    if pickles and not has_safe and not allow_pickle:
        problems.append(
            f"model: {ref!r} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; convert "
            "them to safetensors, or set `allow_pickle: true` if you trust the file"
        )
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return problems + [f"model: {path / 'config.json'} is not readable JSON; re-copy the model folder"]
    if isinstance(config, dict) and config.get("auto_map") and not trust_remote_code:
        problems.append(
            f"model: {ref!r} ships its own Python code (auto_map in config.json); set `trust_remote_code: true` only "
            "if you trust it"
        )
    return problems


def check_safetensors(file: Path, what: str = "file") -> None:
    """UserError when ``file`` is not a complete safetensors file (truncated, overwritten, half-copied)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception as e:  # safetensors raises SafetensorError / OSError
        raise UserError(
            f"{file}: corrupted {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); delete the stage "
            "folder that wrote it and rerun to retrain it, or re-copy the file"
        ) from None


def check_adapter_folder(path: Path) -> None:
    """An adapter folder must hold ``adapter_model.safetensors`` (never pickle) that is complete."""
    weights = Path(path) / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [f.name for f in Path(path).glob("adapter_model.*") if f.suffix in PICKLE_SUFFIXES]
        hint = f" (found pickle {pickled[0]}: convert it to safetensors)" if pickled else ""
        raise UserError(f"{path}: no adapter_model.safetensors{hint}; only safetensors adapters are loaded")
    check_safetensors(weights, "adapter weights")
