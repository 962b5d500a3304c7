#!/usr/bin/env bash
# A first run on an offline GPU box that already holds CUDA torch, transformers, peft and accelerate (no TRL, datasets,
# pydantic or vLLM), in at most 8 minutes. Run from anywhere; it works in the repository root.
#
#   scripts/gpu_check.sh                     on the GPU box: installs our missing pure-Python dependencies from
#                                            wheels/ (offline), then the `gpu` tests and `alignment bench rollout
#                                            --size 0.5b`, and prints what it measured (also into $OUT or gpu-check-out/)
#   scripts/gpu_check.sh --dry-run           on a CPU machine: wheels/ is complete for the box (Python 3.12) and the
#                                            `gpu` tests collect; exits 0 when both hold
#   scripts/gpu_check.sh --build-wheels [DIR]   (`make wheels`) downloads those wheels into DIR (default wheels/)
#
# The box's packages are listed in scripts/gpu_box_packages.txt; the wheels are the pins of constraints-cuda.txt for
# the distributions scripts/gpu_wheels.py names (WHEEL_DISTS), ~5 MiB. Environment: PYTHON (default python3),
# WHEELS (default wheels), OUT (where the measurements go; the device tool sets it).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
MODE=${1:-run}
START=$(date +%s)
say() { echo "gpu_check: $*"; }
elapsed() { echo $(( $(date +%s) - START )); }

build_wheels() {
    local dir=${1:-$WHEELS} platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    for m in $(seq 35 -1 17); do platforms+=(--platform "manylinux_2_${m}_x86_64"); done
    mapfile -t pins < <("$PY" scripts/gpu_wheels.py pins) || exit 1
    mkdir -p "$dir"
    rm -f "$dir"/*.whl
    say "downloading ${#pins[@]} wheels for CPython 3.12 into $dir: ${pins[*]}"
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= "$PY" -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" \
        -d "$dir" "${pins[@]}" || exit 1
    "$PY" scripts/gpu_wheels.py check "$dir" --box scripts/gpu_box_packages.txt
}

dry_run() {
    local rc=0
    bash -n scripts/gpu_check.sh || rc=1
    "$PY" scripts/gpu_wheels.py check "$WHEELS" --box scripts/gpu_box_packages.txt || rc=1
    local help
    help=$("$PY" -m alignment bench rollout --help 2>&1)
    for opt in --size --engines --out --batches --repeats; do
        grep -q -- "$opt" <<<"$help" || { say "alignment bench has no $opt"; rc=1; }
    done
    local collected
    collected=$(OMP_NUM_THREADS=1 "$PY" -m pytest --collect-only -q -m gpu -p no:cacheprovider -p no:xdist tests 2>&1)
    local n
    n=$(grep -c "::" <<<"$collected")
    if [[ $n -gt 0 ]] && grep -q "tests/test_gpu.py::" <<<"$collected"; then
        say "$n gpu tests collect: $(grep -o '^tests/[^:]*' <<<"$collected" | sort | uniq -c | awk '{printf "%s (%s) ", $2, $1}')"
    else
        say "the gpu tests do not collect:"; tail -20 <<<"$collected"; rc=1
    fi
    [[ $rc -eq 0 ]] && say "dry run ok ($(elapsed) s)" || say "dry run FAILED"
    exit $rc
}

case "$MODE" in
    --build-wheels) build_wheels "${2:-$WHEELS}"; exit $? ;;
    --dry-run) dry_run ;;
    run) ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run | --build-wheels [DIR]]" >&2; exit 2 ;;
esac

# ------------------------------------------------------------------------------------------------ on the GPU box
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.txt"
exec > >(tee "$LOG") 2>&1
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

"$PY" - <<'EOF' || { say "no CUDA device: this is the GPU box's check (on a CPU machine: --dry-run)"; exit 1; }
import sys, torch, transformers
assert torch.cuda.is_available()
print(f"gpu_check: Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
EOF

[[ -d "$WHEELS" ]] || { say "no $WHEELS/ folder: build it where PyPI is reachable (make wheels) and bring it"; exit 1; }
say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS/ (offline, --no-deps) and our package"
if ! "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --no-compile "$WHEELS"/*.whl; then
    say "cannot install into $PY's environment: installing into /tmp/alignment-site (PYTHONPATH) instead"
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --no-compile --upgrade --target /tmp/alignment-site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/alignment-site${PYTHONPATH:+:$PYTHONPATH}
fi
# our package itself, without its dependencies (the box's torch/transformers/peft/accelerate stay as they are)
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir . 2>/dev/null \
    || { say "our package not installed (no setuptools?): running from the source tree"; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; }
"$PY" scripts/gpu_wheels.py check "$WHEELS" --installed || exit 1
"$PY" -c "import alignment, stages, reward_models, trl, peft, datasets, pydantic" || exit 1

ENGINES=hf
if "$PY" -c "import vllm" 2>/dev/null; then
    ENGINES=hf,vllm-lora,vllm-merged
    say "vLLM $("$PY" -c 'import vllm; print(vllm.__version__)'): benched too"
else
    say "vLLM: not installed here, skipped (its tests skip; install it with constraints-cuda.txt where PyPI is reachable)"
fi

say "gpu tests ($(elapsed) s so far)"
timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider -p no:xdist --durations=10 --junitxml "$OUT/gpu-tests.xml" tests
TESTS_RC=$?

say "alignment bench rollout --size 0.5b --engines $ENGINES ($(elapsed) s so far)"
timeout 150 "$PY" -m alignment bench rollout --size 0.5b --engines "$ENGINES" --batches 8,32,64 --repeats 2 \
    --out "$OUT/bench"
BENCH_RC=$?
if [[ -f "$OUT/bench/rollout.md" ]]; then
    say "measured (docs/benchmarks.md takes these figures):"
    cat "$OUT/bench/rollout.md"
fi

say "gpu tests: exit $TESTS_RC; bench: exit $BENCH_RC; $(elapsed) s in all; log and results in $OUT/"
[[ $TESTS_RC -eq 0 && $BENCH_RC -eq 0 ]]
