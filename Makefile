# Every target does its own idempotent set-up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's metadata changed since the last install.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[dev,demo]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) cli.py fit --config configs/quickstart.yaml
	$(PY) cli.py test --config configs/quickstart.yaml --ckpt_path last

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(PY) -m ruff check er_lightning tests benchmarks cli.py
	$(PY) -m ruff format --check er_lightning tests benchmarks cli.py

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_sparse.py

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache
