"""Atomic file writes: every artifact, metrics file and marker goes to a temporary name, then is renamed.

In a multi-process run, writes under a folder registered with ``main_process_writes`` happen on rank 0 only (the
other ranks train the same model on other data shards and must not race it); ``atomic_dir`` then waits for every
rank, so a folder written by rank 0 is complete before any rank reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable


_MAIN_ONLY: list[Path] = []  # folders that only rank 0 writes in a multi-process run


@contextlib.contextmanager
def main_process_writes(root: Path):
    _MAIN_ONLY.append(Path(root).resolve())
    try:
        yield
    finally:
        _MAIN_ONLY.pop()


@contextlib.contextmanager
def unguarded():
    """Inside it, this process writes rank-0-only folders directly, without the end-of-write barriers: for a writer
    that rank 0 alone runs while the other ranks wait at a barrier of their own (checkpoints of our own loops)."""
    saved = list(_MAIN_ONLY)
    _MAIN_ONLY.clear()
    try:
        yield
    finally:
        _MAIN_ONLY[:] = saved


def _guarded(path: Path) -> bool:
    """True when ``path`` is in a rank-0-only folder of a multi-process run."""
    from alignment import distributed

    if distributed.world_size() == 1 or not _MAIN_ONLY:
        return False
    resolved = Path(path).resolve()
    return any(resolved == root or root in resolved.parents for root in _MAIN_ONLY)


def skip_write(path: Path) -> bool:
    """True on ranks other than 0 for paths in a rank-0-only folder: the caller writes nothing."""
    from alignment import distributed

    return _guarded(path) and not distributed.is_main()


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    if skip_write(path):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside ``path`` for a writer that takes a path (safetensors, savefig); if the block
    succeeds it replaces ``path``, else it is removed."""
    path = Path(path)
    if skip_write(path):
        with tempfile.TemporaryDirectory(prefix="alignment-rank-scratch-") as scratch:
            yield Path(scratch) / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside ``path``; if the block succeeds it replaces ``path``, else it is removed."""
    from alignment import distributed

    path = Path(path)
    guarded = _guarded(path)
    if guarded and not distributed.is_main():  # build it in a scratch folder nobody reads, then wait for rank 0
        tmp = Path(tempfile.mkdtemp(prefix="alignment-rank-scratch-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if guarded:
        distributed.barrier()
