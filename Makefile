# The README's two commands: `make demo` and `make test`. Both set up .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.evomerge-installed

export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test demo bench lint format clean

setup: $(STAMP)

# Re-installs only when the dependency declarations change. torch comes from constraints.txt
# (2.13.0, a CPU wheel on disk) before anything else can ask for a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: setup
	$(VENV)/bin/ruff check evomerge tests benchmarks
	$(VENV)/bin/ruff format --check evomerge tests benchmarks
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/evomerge demo

bench: setup
	$(PY) benchmarks/zoo_table.py
	$(PY) benchmarks/fitness_speed.py
	$(PY) benchmarks/optimizer_efficiency.py
	$(PY) benchmarks/search_throughput.py
	$(PY) benchmarks/merge_speed.py
	$(PY) benchmarks/resident_merge.py

lint: setup
	$(VENV)/bin/ruff check evomerge tests benchmarks
	$(VENV)/bin/ruff format --check evomerge tests benchmarks

format: setup
	$(VENV)/bin/ruff format evomerge tests benchmarks
	$(VENV)/bin/ruff check --fix evomerge tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
