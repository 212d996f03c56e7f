# certkit: `make demo` runs the main job, `make test` the whole test suite, `make test-fast` all but the tests
# marked slow (subprocess, multi-process, demo and long real-data runs), `make lint` ruff and mypy. Each sets
# up what it needs on a fresh machine: the .venv with certkit and its dev extras (pytest, ruff, mypy), and
# the Debian package with Fashion-MNIST.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
STAMP  := $(VENV)/.certkit-installed

.PHONY: demo test test-fast lint data bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] || [ ! -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    echo "installing dataset-fashion-mnist (Fashion-MNIST into $(FMNIST))"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	      || { echo "make: could not install the Debian package dataset-fashion-mnist (files expected in $(FMNIST))" >&2; exit 1; }; \
	  else \
	    echo "make: Fashion-MNIST is missing from $(FMNIST) and apt-get is unavailable: install the Debian package dataset-fashion-mnist, or set CERTKIT_DATA to a folder with the IDX files" >&2; exit 1; \
	  fi; \
	fi

demo: $(STAMP) data
	$(PY) -m certkit demo

test: $(STAMP) data
	$(PY) -m pytest -q

test-fast: $(STAMP) data
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy certkit

bench: $(STAMP) data
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-out .pytest_cache
