"""Helper of scripts/gpu_check.sh: which wheels an offline GPU box needs, and whether a wheel folder covers them.

    python scripts/gpu_wheels.py pins                  NAME==VERSION for each of WHEEL_DISTS, from constraints-cuda.txt
    python scripts/gpu_wheels.py check WHEELS --box scripts/gpu_box_packages.txt
        (a CPU machine) every requirement of our code (pyproject's dependencies, and pytest) and of every wheel in
        WHEELS is met by WHEELS plus the packages the box is known to hold, for CPython 3.12 on Linux x86_64
    python scripts/gpu_wheels.py check WHEELS --installed
        (the box, after the install) the same against what this interpreter really has installed

Standard library and `packaging` only (both there on the box). Exit status 1 with one line per gap.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# What the box lacks of our dependencies' closure (scripts/gpu_box_packages.txt holds the rest): TRL, datasets and
# pydantic with their own missing needs, and platformdirs. Not torch/transformers/peft/accelerate (there, CUDA
# builds), not vllm (a CUDA build of several GB: the check skips it), not wandb (imported only when a run logs to it).
# fsspec and typing-extensions are there, but in a version we cannot know ahead: datasets needs fsspec<=2026.9.0,
# pydantic typing-extensions>=4.14.1; both small, and installing ours over the box's breaks nothing of torch's.
WHEEL_DISTS = ["trl", "datasets", "dill", "multiprocess", "pydantic", "pydantic-core", "annotated-types",
               "typing-inspection", "platformdirs", "fsspec", "typing-extensions"]
NOT_NEEDED_THERE = {"wandb"}  # optional at run time (logging.wandb); the check runs with WANDB_MODE=disabled
BOX_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def pins(constraints: Path = REPO / "constraints-cuda.txt") -> list[str]:
    pinned = {}
    for line in constraints.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pinned[canonicalize_name(name)] = version.strip()
    missing = [d for d in WHEEL_DISTS if canonicalize_name(d) not in pinned]
    if missing:
        sys.exit(f"{constraints.name} pins none of {missing}: regenerate it (make lock-cuda)")
    return [f"{d}=={pinned[canonicalize_name(d)]}" for d in WHEEL_DISTS]


def our_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["test"] if r.startswith("pytest>")]
    return [r for r in reqs if canonicalize_name(r.name) not in NOT_NEEDED_THERE]


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        meta = Parser().parsestr(z.read(name).decode())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def fits_box(wheel: Path) -> bool:
    """A wheel that installs on CPython 3.12, Linux x86_64 (glibc 2.35)."""
    _, _, _, tags = parse_wheel_filename(wheel.name)
    for tag in tags:
        interp_ok = tag.interpreter in ("py3", "py312", "cp312") or (
            tag.abi == "abi3" and tag.interpreter.startswith("cp3") and int(tag.interpreter[3:]) <= 12)
        abi_ok = tag.abi in ("none", "abi3", "cp312")
        m = re.fullmatch(r"manylinux_2_(\d+)_x86_64", tag.platform)
        plat_ok = tag.platform == "any" or tag.platform in ("manylinux1_x86_64", "manylinux2010_x86_64",
                                                            "manylinux2014_x86_64") or (m and int(m[1]) <= 35)
        if interp_ok and abi_ok and plat_ok:
            return True
    return False


def check(folder: Path, box: Path | None) -> int:
    problems, wheels = [], sorted(folder.glob("*.whl"))
    have: dict[str, Version | None] = {}
    if box is not None:  # a CPU machine: the box's list, then the wheels
        env = BOX_ENV
        for line in box.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                name, _, version = line.partition("==")
                have[canonicalize_name(name)] = Version(version) if version else None
        in_folder: dict[str, list[str]] = {}
        for w in wheels:
            name, version, _, _ = parse_wheel_filename(w.name)
            in_folder.setdefault(name, []).append(str(version))
            have[name] = version
            if not fits_box(w):
                problems.append(f"{w.name}: not a wheel for CPython 3.12 on Linux x86_64")
        for name, versions in in_folder.items():
            if len(versions) > 1:
                problems.append(f"{name}: {len(versions)} versions in {folder} ({', '.join(versions)}): keep one")
        for spec in pins():
            name, version = spec.split("==")
            if str(have.get(canonicalize_name(name))) != version or canonicalize_name(name) not in in_folder:
                problems.append(f"{spec}: no such wheel in {folder} (make wheels)")
    else:  # the box: what this interpreter has installed, wheels included
        from importlib.metadata import distributions

        env = None
        for dist in distributions():
            have[canonicalize_name(dist.metadata["Name"])] = Version(dist.version)
    needs = [(r, "our code") for r in our_requirements()]
    needs += [(r, w.name) for w in wheels for r in wheel_requirements(w)]
    for req, who in needs:
        if req.marker is not None and not req.marker.evaluate(env or {"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in have:
            problems.append(f"{req} (needed by {who}): neither in {folder} nor {'listed for' if box else 'on'} the box")
        elif have[name] is not None and not req.specifier.contains(have[name], prereleases=True):
            problems.append(f"{req} (needed by {who}): the box has {name} {have[name]}")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    for p in problems:
        print(f"  missing: {p}")
    print(f"{folder}: {len(wheels)} wheels, {size:.1f} MiB; "
          + ("complete" if not problems else f"{len(problems)} gap(s)")
          + (f" for the box of {box}" if box else " on this machine"))
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pins")
    c = sub.add_parser("check")
    c.add_argument("folder", type=Path)
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--box", type=Path, help="the box's package list (scripts/gpu_box_packages.txt)")
    where.add_argument("--installed", action="store_true", help="check against this interpreter's packages")
    args = parser.parse_args()
    if args.command == "pins":
        print("\n".join(pins()))
        return 0
    if not args.folder.is_dir():
        print(f"{args.folder}: no such folder (make wheels)")
        return 1
    return check(args.folder, None if args.installed else args.box)


if __name__ == "__main__":
    sys.exit(main())
