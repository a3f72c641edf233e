# The two commands of the README: `make repro` and `make test`.
# Both create .venv when missing and (re)install the project when pyproject.toml changed.
# pip compiles the installed modules' bytecode one file at a time; compileall on every core
# does the same in about half the time (52 s against 95 s on the 2-core CPU). Its `|| true` is on
# purpose: torch ships a Python-3.12-only file (torch/testing/_internal/py312_intrinsics.py) that
# cannot compile on 3.11, which pip's own compile step skips silently too.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install repro test test-slow lint format bench clean-outputs

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q --no-compile -e '.[dev]'
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	rm -f $(VENV)/.installed-*
	touch $@

repro: $(STAMP)
	$(PY) -m stages.repro --local-ray   # dvc repro, all stages on one local Ray cluster

test: $(STAMP) lint
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# mypy: the type checker ([tool.mypy] in pyproject.toml: strict on pipeline.config, .model and
# .data, its default level on the rest of pipeline/ and stages/): ~45 s of CPU from a cold cache,
# ~4 s with its cache (.mypy_cache).
lint: $(STAMP)
	ruff check .
	ruff format --check .
	lint-imports
	mypy

format: $(STAMP)
	ruff check --fix .
	ruff format .

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean-outputs:
	rm -rf data models checkpoints samples metrics plots figures reports reference mlflow.db mlruns
