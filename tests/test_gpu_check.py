"""scripts/gpu_check.sh and its helper on a CPU machine, without the network.

The full `scripts/gpu_check.sh --dry-run` needs the real wheels (`make wheels`, PyPI): it runs here only when
wheels/ exists. The rest builds stand-in wheels (the pinned names and versions, no dependencies of their own) and
checks that the box's package list plus the wheels cover every dependency of pyproject.toml, so a new dependency
that the box lacks fails here until it is added to WHEEL_DISTS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = REPO / "scripts"


def helper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "gpu_wheels.py"), *args], capture_output=True, text=True,
                          timeout=120)


def stand_in_wheels(folder: Path, skip: str | None = None) -> None:
    folder.mkdir()
    for spec in helper("pins").stdout.split():
        name, version = spec.split("==")
        if name == skip:
            continue
        dist = name.replace("-", "_")
        with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{dist}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_the_scripts_parse_and_pin_every_wheel_from_constraints_cuda():
    for script in ("gpu_check.sh", "lock_cuda.sh"):
        assert subprocess.run(["bash", "-n", str(SCRIPTS / script)]).returncode == 0
    pins = helper("pins")
    assert pins.returncode == 0, pins.stdout + pins.stderr
    names = [p.split("==")[0] for p in pins.stdout.split()]
    assert {"trl", "datasets", "pydantic"} <= set(names)
    assert not {"torch", "transformers", "peft", "accelerate", "vllm"} & set(names)  # the box's own, or skipped


def test_box_list_and_wheels_cover_our_dependencies(tmp_path):
    stand_in_wheels(tmp_path / "wheels")
    ok = helper("check", str(tmp_path / "wheels"), "--box", str(SCRIPTS / "gpu_box_packages.txt"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "complete" in ok.stdout
    stand_in_wheels(tmp_path / "short", skip="pydantic")
    gap = helper("check", str(tmp_path / "short"), "--box", str(SCRIPTS / "gpu_box_packages.txt"))
    assert gap.returncode == 1
    assert "pydantic==" in gap.stdout and "no such wheel" in gap.stdout
    assert "pydantic<3,>=2.7 (needed by our code)" in gap.stdout


@pytest.mark.skipif(not (REPO / "wheels").is_dir(), reason="needs wheels/ (make wheels, with PyPI)")
def test_gpu_check_dry_run():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dry run ok" in proc.stdout and "tests/test_gpu.py" in proc.stdout
