"""Session-scoped fixtures shared by the suite: one toy build, one trained SFT run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers: one thread each (two multi-threaded torch processes on two cores thrash), and each
    # worker's vLLM engine on its own core. Set before torch is imported.
    _worker = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(_worker % (os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def toy_dir() -> Path:
    from alignment.toy.build import ensure_toy

    return ensure_toy()


@pytest.fixture(scope="session")
def sft_run(toy_dir, tmp_path_factory):
    """configs/sft.yaml run once; returns (pipeline, summary, run_dir). Later stages' tests start from it."""
    from alignment.pipeline import Pipeline

    out = tmp_path_factory.mktemp("runs")
    pipeline = Pipeline.from_yaml(REPO / "configs" / "sft.yaml", [f"output_dir={out}", "logging.log_every=50"])
    summary = pipeline.run()
    return pipeline, summary, out / "sft"


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None):
    """Run `python -m alignment ...` in a subprocess (fresh interpreter, like a user)."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "alignment", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900
    )


def _run_config(name: str, tmp_path_factory, *overrides: str):
    from alignment.pipeline import Pipeline

    out = tmp_path_factory.mktemp("runs")
    pipeline = Pipeline.from_yaml(REPO / "configs" / f"{name}.yaml", [f"output_dir={out}", "logging.log_every=50", *overrides])
    return pipeline, pipeline.run(), out / pipeline.config.name


@pytest.fixture(scope="session")
def reward_run(toy_dir, tmp_path_factory):
    """configs/reward.yaml (SFT -> reward model) run once."""
    return _run_config("reward", tmp_path_factory)


@pytest.fixture(scope="session")
def dpo_run(toy_dir, tmp_path_factory):
    """configs/sft_dpo.yaml run once."""
    return _run_config("sft_dpo", tmp_path_factory)


@pytest.fixture(scope="session")
def ppo_run(toy_dir, tmp_path_factory):
    """configs/sft_rm_ppo.yaml (SFT -> reward -> PPO) run once."""
    return _run_config("sft_rm_ppo", tmp_path_factory)


def expect_gain(measured: float, baseline: float, target: float, what: str) -> None:
    """A learning-quality target that toy v17 does not meet on every world yet (PPO: worlds 0-1 yes, 2-3 no; DPO:
    worlds 0-1 only measured; GRPO, RLOO, KTO, ORPO, the continual sentiment task after 40 steps: not met on world 0):
    the test *xfails* (with the figures) while ``measured < baseline + target``, and passes once it is met. SFT's and
    the reward model's targets are hard assertions, met on worlds 0-3 (docs/benchmarks.md, `alignment bench toy`).
    Every other assertion of these tests is a hard one.
    """
    if measured < baseline + target:
        pytest.xfail(f"{what}: {measured:.4f} < {baseline:.4f} + {target} (toy v17: not yet calibrated, issue 19)")
