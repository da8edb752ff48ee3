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

# The demo: DM, IPC 10, on the embedded MNIST subset, with a schedule shortened to fit a few
# minutes on 2 CPU cores (published: 20000 iterations, batch_real 256, 1000 epochs, 5+ repeats).
DEMO_SCHEDULE := --iterations 100 --set batch_real=32 --epochs 200 --repeats 2

run: $(STAMP)
	$(VENV)/bin/condense distill --dataset default --method dm --ipc 10 $(DEMO_SCHEDULE) \
		--evaluate --baseline --checkpoint-every 50 --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --timeout 900

clean:
	rm -rf build $(VENV) condense_engine/_C*.so out
