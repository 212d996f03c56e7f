# certkit: `make demo` runs the main job, `make test` the test suite. Both set everything up on a fresh
# machine: the .venv with certkit and its dev extras, and the Debian package with Fashion-MNIST.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
STAMP  := $(VENV)/.certkit-installed

.PHONY: demo test data bench clean

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

bench: $(STAMP) data
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-out .pytest_cache
