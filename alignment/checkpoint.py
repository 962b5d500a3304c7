"""Checkpoints and resume: a stage killed at any moment continues from its last *complete* checkpoint.

    <i>-<kind>/STARTED                 the fingerprint of the stage run that owns this folder (written first)
    <i>-<kind>/checkpoints/<name>-<N>/  one checkpoint per N steps (TRL: checkpoint-N, online stages: iter-N)
        ...                            trainer files (TRL) or adapters + state.safetensors + state.json (online)
        COMPLETE                       written last, atomically: a folder without it is half-written and ignored

A rerun of the same command finds ``STARTED`` with the same fingerprint and no ``DONE``: it keeps ``checkpoints/``
(dropping half-written ones) and ``metrics.jsonl`` (cut back to the checkpoint's step), wipes the rest, and the stage
resumes from ``ctx.resume``. Anything else (another fingerprint, no complete checkpoint) starts the folder clean.

Online stages save their own state without pickle: tensors (optimiser moments, RNG states, heads) in safetensors,
everything else (optimiser hyper-parameters, Python RNG, iteration, counters) in JSON; ``torch.load`` is never used.

SIGINT (Ctrl-C) is turned into a request: the running stage writes a checkpoint at the end of its current step,
then raises ``KeyboardInterrupt`` (the CLI exits 130). A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from alignment.errors import UserError
from alignment.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, unguarded

STARTED = "STARTED"
COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}

# ----------------------------------------------------------------------------------------- checkpoint folders


def checkpoint_step(folder: Path) -> int:
    """The step / iteration number at the end of a checkpoint folder's name (``checkpoint-12``, ``iter-00012``)."""
    match = re.search(r"(\d+)$", Path(folder).name)
    return int(match.group(1)) if match else -1


def mark_complete(folder: Path, step: int) -> None:
    """Written last: the step and every file of the checkpoint with its size."""
    folder = Path(folder)
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    atomic_write_json(folder / COMPLETE, {"step": step, "at": time.time(), "files": files})


def is_complete(folder: Path) -> bool:
    """``COMPLETE`` exists and every file it lists is there with its size (a checkpoint whose deletion or copy was
    cut short is not complete)."""
    folder = Path(folder)
    try:
        files = read_json(folder / COMPLETE).get("files", {})
    except (OSError, ValueError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def drop_incomplete(root: Path) -> list[Path]:
    """Remove half-written checkpoint folders under ``root`` (and temp folders of atomic writes); returns them."""
    removed = []
    if not Path(root).is_dir():
        return removed
    for folder in Path(root).iterdir():
        if folder.is_dir() and (folder.name.startswith(".") or not is_complete(folder)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (half-written ones are never chosen)."""
    if not Path(root).is_dir():
        return None
    complete = [f for f in Path(root).iterdir() if f.is_dir() and not f.name.startswith(".") and is_complete(f)]
    return max(complete, key=checkpoint_step, default=None)


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints."""
    complete = sorted((f for f in Path(root).iterdir() if f.is_dir() and is_complete(f)), key=checkpoint_step)
    for folder in complete[:-keep]:
        (folder / COMPLETE).unlink()  # first: a deletion cut short leaves an incomplete folder, never a broken one
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------- stage folders


def prepare_stage_dir(stage_dir: Path, fingerprint: str) -> Path | None:
    """Make ``stage_dir`` ready for a run of the stage with ``fingerprint``; returns the checkpoint to resume from.

    Resumes only when the folder was started by the same fingerprint (same config, inputs and upstream stages) and
    holds a complete checkpoint; otherwise the folder is wiped (a changed or never-checkpointed stage starts clean).
    """
    resume = None
    started = stage_dir / STARTED
    if started.is_file():
        try:
            same = read_json(started).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            same = False
        if same:
            drop_incomplete(stage_dir / CHECKPOINTS)
            resume = latest_checkpoint(stage_dir / CHECKPOINTS)
    if stage_dir.exists():
        keep = {CHECKPOINTS, "metrics.jsonl", STARTED} if resume else set()
        for item in stage_dir.iterdir():
            if item.name not in keep:
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    stage_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _cut_metrics(stage_dir / "metrics.jsonl", checkpoint_step(resume))
    atomic_write_json(started, {"fingerprint": fingerprint, "started_at": time.time()})
    return resume


def _cut_metrics(path: Path, step: int) -> None:
    """Drop metrics lines logged after the checkpoint the stage resumes from (they will be logged again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except ValueError:
            break  # a line cut short by the kill: everything after it is gone too
    atomic_write_text(path, "".join(kept))


def disk_full_error(error: BaseException, stage: str, stage_dir: Path) -> UserError | None:
    """A UserError when ``error`` is a write that failed for lack of space (ENOSPC, EFBIG, EDQUOT), after removing
    the half-written checkpoint; None for anything else.

    ``torch.save`` reports a failed write as a RuntimeError without the errno; for those a 1 MiB probe write in the
    stage folder tells whether the disk (or the file-size limit) is the cause.
    """
    code = _write_errno(error, stage_dir)
    if code is None:
        return None
    drop_incomplete(stage_dir / CHECKPOINTS)
    return UserError(
        f"{stage}: no space left writing into {stage_dir} ({errno.errorcode.get(code, code)}); free disk space (or "
        "raise the file-size limit) and rerun the same command: it resumes from the last complete checkpoint"
    )


def _write_errno(error: BaseException, stage_dir: Path) -> int | None:
    chain, seen = [], error
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e.errno
    torch_write = ("file write failed", "iostream error", "unexpected pos")
    if any(isinstance(e, RuntimeError) and any(t in str(e) for t in torch_write) for e in chain):
        probe = stage_dir / ".space-probe"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            return e.errno if e.errno in DISK_FULL else None
        finally:
            probe.unlink(missing_ok=True)
    return None


# ------------------------------------------------------------------------ online stages: state without pickle


def save_online_checkpoint(folder: Path, step: int, tensors: dict, optimizers: dict, state: dict,
                           adapters=None) -> None:
    """One checkpoint folder, written as a whole (temp folder, then rename) with ``COMPLETE`` last.

    ``tensors``: name -> tensor (heads...); ``optimizers``: name -> torch optimiser; ``state``: JSON-able values;
    ``adapters``: callable(folder) that saves the adapters into the temp folder.
    """
    import torch
    from safetensors.torch import save_file

    from alignment import distributed, faults

    flat = {f"tensor/{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta: dict[str, Any] = {"step": step, "state": state, "optimizers": {}}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        meta["optimizers"][name] = {"param_groups": sd["param_groups"], "state": {}}
        for pid, values in sd["state"].items():
            scalars = {}
            for key, value in values.items():
                if torch.is_tensor(value):
                    flat[f"optim/{name}/{pid}/{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[key] = value
            meta["optimizers"][name]["state"][str(pid)] = scalars
    flat["rng/torch"] = torch.get_rng_state()
    if distributed.world_size() > 1:  # each rank's torch RNG (sampling, minibatch order): every rank resumes its own
        for r, s in enumerate(distributed.gather_objects(torch.get_rng_state())):
            flat[f"rng/torch/rank{r}"] = s
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            flat[f"rng/cuda/{i}"] = s
    if distributed.world_size() > 1 and not distributed.is_main():
        return  # rank 0 writes the checkpoint; the caller's barrier waits for it
    with unguarded(), atomic_dir(folder) as tmp:
        if adapters is not None:
            adapters(tmp)
        save_file(flat, str(tmp / "state.safetensors"))
        faults.kill_point(folder.parent.parent.name, f"save:{step}")  # test hook: dies with a half-written folder
        (tmp / "state.json").write_text(json.dumps(meta, default=_jsonable))
        mark_complete(tmp, step)


def load_online_checkpoint(folder: Path, optimizers: dict) -> tuple[dict, dict]:
    """Restores the optimisers and the torch RNG from ``folder``; returns (tensors, state)."""
    import torch
    from safetensors.torch import load_file

    flat = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    for name, opt in optimizers.items():
        saved = meta["optimizers"][name]
        state = {}
        for pid, scalars in saved["state"].items():
            prefix = f"optim/{name}/{pid}/"
            state[int(pid)] = {**scalars, **{k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}}
        opt.load_state_dict({"param_groups": saved["param_groups"], "state": state})
    from alignment import distributed

    own = f"rng/torch/rank{distributed.rank()}"  # written by multi-process runs (every rank resumes with its own)
    torch.set_rng_state(flat[own] if own in flat else flat["rng/torch"])
    cuda = [flat[k] for k in sorted(flat) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    tensors = {k[len("tensor/"):]: v for k, v in flat.items() if k.startswith("tensor/")}
    return tensors, meta["state"]


def due(ctx, step: int, every: int, last: int) -> bool:
    """Whether a stage's own loop writes a checkpoint after ``step``: every ``every`` steps and when Ctrl-C is
    pending, never after the last step (the stage's artifacts follow at once)."""
    from alignment import distributed, faults

    faults.kill_point(ctx.dir.name, f"step:{step}")
    interrupted = interrupt_requested()
    if distributed.world_size() > 1:  # every rank must take the same decision (the checkpoint gathers from all)
        interrupted = any(distributed.gather_objects(interrupted))
    return (step % every == 0 or interrupted) and step < last


def write_stage_checkpoint(ctx, step: int, adapters: tuple[str, ...], tensors: dict, optimizers: dict,
                           state: dict) -> None:
    """A checkpoint of a stage's own loop: the named adapters of ``ctx.policy``, ``tensors``, ``optimizers``, the
    torch and Python RNGs and ``state``; keeps the newest two; then honours a pending Ctrl-C.

    Under ``accelerate launch`` every rank calls it at the same step: adapters, tensors and optimisers are equal on
    all ranks (averaged gradients) and rank 0 writes them; what may differ per rank (``state``, the RNGs) is gathered
    and stored for each rank (``state["ranks"]``, ``rng/torch/rank<r>``); the others wait until the folder is
    complete."""
    import random

    from alignment import distributed

    def save_adapters(folder):
        for name in adapters:
            ctx.policy.save_adapter(name, folder / name)

    root = ctx.dir / CHECKPOINTS
    state = {**state, "python_rng": python_rng_state(random)}
    if distributed.world_size() > 1:
        state = {**state, "ranks": distributed.gather_objects(state)}
    state["world_size"] = distributed.world_size()
    save_online_checkpoint(root / f"iter-{step:05d}", step, tensors, optimizers, state, save_adapters)
    if distributed.is_main():
        prune(root, keep=2)
    distributed.barrier()  # the checkpoint is complete (and pruned) before any rank goes on
    stop_if_interrupted(f"{ctx.label} step {step}")


def read_stage_checkpoint(ctx, adapters: tuple[str, ...], tensors: dict, optimizers: dict) -> dict | None:
    """Restore what ``write_stage_checkpoint`` saved in ``ctx.resume`` (adapters and ``tensors`` in place, so
    optimisers over them stay valid); returns its ``state``, or None when the stage starts fresh."""
    import random

    import torch

    from alignment.metrics import console

    folder = ctx.resume
    if folder is None:
        return None
    for name in adapters:
        load_adapter_weights(ctx.policy.model, name, folder / name / "adapter_model.safetensors")
    from alignment import distributed

    saved, state = load_online_checkpoint(folder, optimizers)
    written_by = state.get("world_size", 1)
    if written_by != distributed.world_size():  # the data shards and the per-rank states would not match
        raise UserError(f"{ctx.label}: {folder} was written by {written_by} process(es), this run has "
                        f"{distributed.world_size()}; rerun with the same number of processes, or delete "
                        f"{folder.parent} to restart the stage")
    if "ranks" in state:  # written by a multi-process run: this rank's own state
        state = state["ranks"][distributed.rank()]
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(saved[name])
    set_python_rng_state(random, state["python_rng"])
    console.print(f"resuming {ctx.dir.name} from {folder.name} (step {checkpoint_step(folder)})")
    return state


def load_adapter_weights(model, name: str, file: Path) -> None:
    """Copy a saved adapter's weights into adapter ``name`` of the peft ``model`` in place (the parameters keep
    their identity, so optimisers built over them stay valid)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(file)), adapter_name=name)


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's state.json")


def python_rng_state(rng) -> list:
    """``random.Random.getstate()`` as JSON (version, 625 ints, gauss); ``set_python_rng_state`` reverses it."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(rng, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


# ----------------------------------------------------------------------------------------------------- SIGINT

_interrupt = threading.Event()


def interrupt_requested() -> bool:
    return _interrupt.is_set()


def stop_if_interrupted(what: str) -> None:
    """Called right after a checkpoint is complete: honour a pending Ctrl-C."""
    if _interrupt.is_set():
        from alignment.metrics import console

        console.print(f"[yellow]interrupted[/yellow]: checkpoint written ({what}); rerun the same command to resume")
        raise KeyboardInterrupt


@contextlib.contextmanager
def graceful_sigint():
    """First Ctrl-C: finish the current step, write a checkpoint, stop (exit 130). Second Ctrl-C: stop at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _interrupt.is_set():
            raise KeyboardInterrupt
        _interrupt.set()
        from alignment.metrics import console

        console.print("[yellow]Ctrl-C[/yellow]: stopping after the current step's checkpoint (again to stop now)")

    _interrupt.clear()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupt.clear()
