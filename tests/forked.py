"""Run the CLI's ``main`` in a child process forked from the test process: a real, separate process (it can be
SIGKILLed, get its own resource limits, exit with its own code), which inherits the already imported torch/TRL and
so starts in milliseconds instead of the ~10 s a fresh interpreter needs."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path


def run_forked(argv: list[str], log: Path, env: dict | None = None, fsize_limit: int | None = None,
               timeout: float = 600) -> tuple[int | None, str]:
    """(exit code, stderr) of ``alignment <argv>`` in a forked child; a negative code is the killing signal."""
    child = multiprocessing.get_context("fork").Process(target=_child, args=(argv, log, env or {}, fsize_limit))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
    return child.exitcode, log.read_text() if log.exists() else ""


def _child(argv, log, env, fsize_limit):
    import resource

    from alignment.app.cli import main

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    for key in ("ALIGNMENT_TEST_KILL_AT", "ALIGNMENT_TEST_KILL_SIGNAL"):
        os.environ.pop(key, None)
    os.environ.update(env)
    if fsize_limit is not None:  # writes past it fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    os._exit(main(argv))
