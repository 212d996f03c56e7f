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

# `make bench` runs, one after another at their documented default sizes (hours on 2 CPU cores; the figures'
# commands are in docs/benchmarks.md): certify_throughput, train_throughput, methods, adaptive, gloro,
# lenet_floor, crt_speedup (re-reports demo-out/quick, training the demo's runs there first if absent),
# amp_quality (skipped, saying so, on a CPU without bf16 instructions) and vs_official (skipped, saying so,
# without the official code in ../shared/peer-code/smoothmix). Not run, and said so: official_certify (needs a
# trained run, --run RUN, and statsmodels) and profile_gpu (a GPU; benchmarks/gpu.sh is the GPU session).
bench: $(STAMP) data
	$(PY) benchmarks/certify_throughput.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/methods.py
	$(PY) benchmarks/adaptive.py
	$(PY) benchmarks/gloro.py
	$(PY) benchmarks/lenet_floor.py
	$(PY) benchmarks/crt_speedup.py
	@if $(PY) -c 'import sys; from certkit.precision import cpu_has_native_bf16; sys.exit(not cpu_has_native_bf16())'; then \
	  echo "$(PY) benchmarks/amp_quality.py"; $(PY) benchmarks/amp_quality.py || exit 1; \
	else echo "bench: amp_quality.py skipped: this CPU has no bf16 instructions (AVX512-BF16 or AMX)"; fi
	@if [ -f ../shared/peer-code/smoothmix/code/train.py ]; then \
	  echo "$(PY) benchmarks/vs_official.py"; $(PY) benchmarks/vs_official.py || exit 1; \
	else echo "bench: vs_official.py skipped: no official code in ../shared/peer-code/smoothmix (a checkout of jh-jeong/smoothmix)"; fi
	@echo "bench: not run: official_certify.py (needs --run RUN, a trained Fashion-MNIST run, and statsmodels), profile_gpu.py (a GPU; see benchmarks/gpu.sh)"

clean:
	rm -rf $(VENV) demo-out .pytest_cache
