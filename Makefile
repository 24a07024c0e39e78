# make train: set up .venv (once) and train on Tiny Shakespeare. make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test bench clean

setup: $(STAMP)

# torch is pinned first so that pip takes the CPU wheel, never a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 -c requirements.lock
	$(PY) -m pip uninstall --quiet --yes charrnn 2>/dev/null || true  # the distribution's name before charrnn-lm
	$(PY) -m pip install --quiet -e ".[test]" -c requirements.lock
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py --data shakespeare

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV)
