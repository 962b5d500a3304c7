"""A quiet first run: the console shows our lines and real warnings; dependencies' noise goes to the run's log.txt."""

from __future__ import annotations

import logging
import re

from tests.conftest import run_cli

NOISE_ON_CONSOLE = re.compile(
    r"Loading safetensors checkpoint shards|gemm_4bit_forward|FutureWarning|Triton|TRL currently supports vLLM|global random seed|Failed to load weights"
    r"|Writing model shards|it/s\]|s/it\]"
)


def test_a_short_online_run_prints_no_noise(toy_dir, tmp_path):
    """SFT then PPO on vLLM (two merged syncs: the reload that printed a shard bar each iteration): the console has
    our per-step lines and summaries only, and the run folder's log.txt keeps the libraries' own lines."""
    cfg = tmp_path / "quiet.yaml"
    cfg.write_text(
        f"name: quiet\noutput_dir: {tmp_path}/runs\nrollout: {{engine: vllm, memory_fraction: 0.3}}\nstages:\n"
        "  - kind: sft\n    max_steps: 4\n"
        "  - kind: ppo\n    reward: toy_gold\n    iterations: 2\n    batch_size: 8\n    minibatch_size: 4\n"
    )
    proc = run_cli("run", str(cfg), env={"PYTHONWARNINGS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert not NOISE_ON_CONSOLE.search(console), NOISE_ON_CONSOLE.search(console).group(0)
    assert "stage 1 (ppo) done" in console and "[1-ppo] step" in console  # our summary and per-step lines
    log = (tmp_path / "runs" / "quiet" / "log.txt").read_text()
    assert "vllm" in log  # vLLM's own INFO lines (engine start, weights loaded) are kept there


def test_console_filter_keeps_real_warnings_and_drops_noise():
    from alignment.quiet import ConsoleFilter

    def record(name, level, msg):
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    keep = ConsoleFilter().filter
    assert keep(record("alignment.pipeline", logging.INFO, "stage 0 done"))
    assert not keep(record("vllm.engine", logging.INFO, "Initializing an engine"))  # others' INFO: log file only
    assert keep(record("transformers.trainer", logging.WARNING, "a real warning"))
    assert not keep(record("bitsandbytes.backends.cpu.ops", logging.WARNING,
                           "Failed to load CPU gemm_4bit_forward from kernels-community"))
    assert not keep(record("py.warnings", logging.WARNING, "x.py:3: FutureWarning: `foo` is deprecated"))
    assert keep(record("py.warnings", logging.WARNING, "x.py:3: UserWarning: something real"))
    assert not keep(record("vllm.v1.worker.cpu_worker", logging.WARNING, "libiomp is not found in LD_PRELOAD. For best"))
    assert keep(record("vllm.engine", logging.WARNING, "a real vLLM warning"))
