# Two entry points on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: run test install clean

install: $(STAMP)

# torch==2.13.0 first, pinned: it is the CPU build; any looser spec would pull a CUDA build.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q setuptools wheel ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

run: $(STAMP)
	$(VENV)/bin/condense demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --timeout 900

clean:
	rm -rf build $(VENV) condense_engine/_C*.so out
