#!/usr/bin/env bash
# Re-pin constraints-cuda.txt: resolve `.[cuda,qlora,test]` against PyPI for a CUDA machine (Linux x86_64, glibc 2.35
# or newer, Python 3.11 by default: the oldest vllm supports, so the pins hold on 3.12 too) without installing anything. `make lock-cuda` runs it.
#
# - A plain pip on PyPI: PIP_CONFIG_FILE=/dev/null and no PIP_FIND_LINKS/PIP_INDEX_URL/PIP_EXTRA_INDEX_URL/PIP_CONSTRAINT,
#   so a machine's local wheel folders and caps (such as a `torch<=` constraint in /etc/xdg/pip) play no part.
# - `--dry-run --ignore-installed --only-binary=:all: --use-feature=fast-deps`: pip reads each wheel's metadata with HTTP
#   range requests, so torch, vllm and the nvidia-* libraries (5 GB of wheels) are never downloaded (~2-3 minutes).
# - The Hugging Face stack (transformers, trl, peft, accelerate, datasets, tokenizers, safetensors, huggingface_hub) is
#   held at the versions of constraints-cpu.txt, so CPU and CUDA run the same library code; the rest (torch, vllm,
#   CUDA libraries) is whatever vllm's pins and PyPI give.
# - Then checks that the written file resolves on Python 3.12 too (a 3.12 resolution alone picks networkx 3.7, which needs 3.12).
#
# Usage: scripts/lock_cuda.sh [--check]     --check: only dry-run the existing constraints-cuda.txt (3.11 and 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${LOCK_VENV:-/tmp/alignment-lock-cuda-venv}
PYVER=${LOCK_PYTHON_VERSION:-3.11}
OUT=constraints-cuda.txt
HF_STACK='transformers|trl|peft|accelerate|datasets|tokenizers|safetensors|huggingface_hub'

export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_NO_INDEX || true

test -x "$VENV/bin/pip" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade "pip>=25"

# manylinux tags of a glibc 2.35 machine (Ubuntu 22.04), the oldest we expect on a CUDA box
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for m in $(seq 35 -1 5); do PLATFORMS+=(--platform "manylinux_2_${m}_x86_64"); done

resolve() {  # resolve PYTHON_VERSION REPORT [pip args...]
    local pyver=$1 report=$2; shift 2
    "$VENV/bin/pip" install --dry-run --ignore-installed --only-binary=:all: --use-feature=fast-deps --no-cache-dir \
        --python-version "$pyver" "${PLATFORMS[@]}" --report "$report" --quiet "$@" ".[cuda,qlora,test]"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ "${1:-}" != "--check" ]]; then
    grep -E -i "^($HF_STACK)==" constraints-cpu.txt > "$tmp/hf-stack.txt"
    echo "resolving .[cuda,qlora,test] for Python $PYVER (HF stack from constraints-cpu.txt: $(tr '\n' ' ' < "$tmp/hf-stack.txt"))"
    resolve "$PYVER" "$tmp/report.json" -c "$tmp/hf-stack.txt"
    "$VENV/bin/python" - "$tmp/report.json" "$PYVER" > "$tmp/$OUT" <<'EOF'
import json, sys
report, pyver = json.load(open(sys.argv[1])), sys.argv[2]
pins = sorted((i["metadata"]["name"], i["metadata"]["version"]) for i in report["install"]
              if i["metadata"]["name"] != "staged-alignment")
pip = report.get("pip_version", "?")
print(f"# Versions resolved together for CUDA machines (Linux x86_64, glibc >= 2.35; Python {pyver}, also checked on 3.12):")
print(f"# pip {pip} on PyPI with no local config, `pip install --dry-run --report` of .[cuda,qlora,test] (no wheel downloaded),")
print("# the Hugging Face stack held at constraints-cpu.txt's versions. PyPI's torch wheels of this version are CUDA 13 builds")
print("# (NVIDIA driver 580 or newer). Regenerate: make lock-cuda (scripts/lock_cuda.sh); check only: scripts/lock_cuda.sh --check")
for name, version in pins:
    print(f"{name}=={version}")
EOF
    mv "$tmp/$OUT" "$OUT"
    echo "wrote $OUT ($(grep -c '==' "$OUT") pins)"
fi

for v in "$PYVER" 3.12; do
    resolve "$v" "$tmp/check-$v.json" -c "$OUT"
    "$VENV/bin/python" - "$tmp/check-$v.json" "$OUT" "$v" <<'EOF'
import json, re, sys
report, out, pyver = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
got = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
pins = dict(norm(l).split("==") for l in open(out) if "==" in l and not l.startswith("#"))
pins = {norm(k): v for k, v in pins.items()}
extra = sorted(set(got) - set(pins) - {"staged-alignment"})
if extra:
    sys.exit(f"Python {pyver}: resolved but not pinned in {out}: {extra}")
print(f"Python {pyver}: {out} resolves ({len(got) - 1} distributions; torch {got['torch']}, vllm {got['vllm']}, "
      f"transformers {got['transformers']}, trl {got['trl']}, peft {got['peft']})")
EOF
done
