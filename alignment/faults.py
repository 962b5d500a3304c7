"""Fault injection for the reliability tests: the process sends itself a real signal at a named point.

    ALIGNMENT_TEST_KILL_AT=<stage folder>:<point>   e.g. 0-sft:step:3, 2-ppo:step:2, 2-ppo:save:2, 1-dpo:done
    ALIGNMENT_TEST_KILL_SIGNAL=KILL|INT             default KILL

``KILL`` is a true ``kill -9`` (SIGKILL: no handler, no cleanup, no flush), exactly what a pre-empted machine
does; ``INT`` is what Ctrl-C sends. Points: ``step:N`` after optimiser step N (before its checkpoint is written),
``save:N`` in the middle of writing checkpoint N, ``done`` right after the stage's ``DONE`` marker. Unset (the
normal case) this costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def kill_point(stage: str, point: str) -> None:
    target = os.environ.get("ALIGNMENT_TEST_KILL_AT")
    if not target or target != f"{stage}:{point}":
        return
    name = os.environ.get("ALIGNMENT_TEST_KILL_SIGNAL", "KILL")
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
