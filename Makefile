# `make demo` and `make test` create the virtual environment when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-adapt clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/train_multimnist.py --out runs/demo --single-task-baselines --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_trainer_overhead.py

bench-adapt: $(STAMP)  ## DANN step vs pytorch-adapt 0.0.83 (installed into benchmarks/.peer, not a dependency)
	$(BIN)/python benchmarks/bench_adapt.py $$(test -d benchmarks/.peer || echo --install-peer)

clean:
	rm -rf runs
