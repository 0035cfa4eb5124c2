# flux2-trt: the two commands a new machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny
PRECISION ?= fp32
ARTIFACTS ?= artifacts/$(MODEL)-$(PRECISION)
PROMPT ?= A photograph of a red fox sitting in fresh snow at dawn

.PHONY: setup demo test lint export clean bench-export

# torch is pinned to the CPU build that lies on this workplace's disk; an unpinned torch would
# pull a multi-GB CUDA build. Production nodes install their own CUDA torch and the extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m export --model $(MODEL) --out $(ARTIFACTS) --precision $(PRECISION)

export: demo

test: setup
	$(PY) -m pytest -q

# Memory and time of exporting full-width FLUX.2 [dev] transformer slices (~15 GB of disk, ~15 min
# on 2 cores): see README "Streaming export".
bench-export: setup
	$(PY) -m bench.export_memory

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf artifacts out
