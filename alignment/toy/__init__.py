"""The embedded default: a tiny Llama-architecture model, its tokenizer and toy data, built locally (no download).

``model: toy`` is world 0, ``model: toy:N`` world N: each world is built from its own seed (tokenizer, base model,
data, held-out evaluation prompts). ``toy:<name>`` data comes from the world of the run (world 0 when the model is
not a toy), set around a run with ``using_world``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from collections.abc import Iterator

_MODEL_REF = re.compile(r"toy(?::(\d+))?")
_active_world = 0


def world_of(model_ref: str) -> int | None:
    """``toy`` -> 0, ``toy:3`` -> 3, anything else (a hub id, a folder) -> None."""
    match = _MODEL_REF.fullmatch(model_ref) if isinstance(model_ref, str) else None
    return None if match is None else int(match.group(1) or 0)


def active_world() -> int:
    """The world ``toy:`` data and the gold evaluator read now."""
    return _active_world


@contextmanager
def using_world(world: int) -> Iterator[None]:
    global _active_world
    previous, _active_world = _active_world, world
    try:
        yield
    finally:
        _active_world = previous
