# Two entry points: `make demo` and `make test`. Both create .venv/ and install into it first.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench proto clean

install: $(STAMP)

# torch is pinned to the CPU 2.13.0 build and installed on its own first, so that nothing
# later can pull a CUDA build. llama-cpp-python compiles from source the first time (~20 min
# on 2 cores); pip caches the wheel afterwards.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgefleet demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/runtime.py

# Regenerate proto/edgefleet_pb2*.py from proto/edgefleet.proto (tests check they are current).
proto: $(STAMP)
	$(PY) -m proto.generate

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
