# Two entry points for a fresh machine:
#   make compare - create .venv, install bigbatch, run `bigbatch compare` (Fashion-MNIST, small
#                  CNN, batch 8192: momentum SGD, LARS, NLCG, SP-NGD) and print its table
#   make test    - create .venv, install bigbatch with its test extras, run lint, types and tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned to the CPU build available on these machines; any
# installed torch >= 2.2 satisfies the package's own requirement afterwards.
TORCH_SPEC ?= torch==2.13.0
DATA_DIR ?= $(firstword $(wildcard ../shared/data/fashion-mnist) $(wildcard /usr/share/datasets/fashion-mnist))

# Where the data is: a local copy if one exists, else a checked download from the official
# source (offline with no copy, bigbatch stops with a message saying how to get the files).
DATA_ARGS ?= $(if $(DATA_DIR),--data-dir $(DATA_DIR),--download)
OUT ?= runs/compare

.PHONY: compare demo test test-fast venv install install-test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"

venv: $(BIN)/python

install: venv
	$(BIN)/python -m pip install --quiet -e .

# curvlinops (a test oracle) needs backpack-for-pytorch, which declares torchvision: installing
# them without dependencies keeps torchvision and a CUDA torch out. asdfghjkl (ASDL, the peer
# K-FAC of the study, a benchmark extra: benchmarks/requirements-peers.txt) is tested too.
ORACLES := curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 linear_operator==0.6.1 \
	unfoldNd==0.2.3 einconv==0.1.0 asdfghjkl==0.1a5

install-test: venv
	$(BIN)/python -m pip install --quiet -e ".[test,dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(ORACLES)

compare: install
	$(BIN)/bigbatch compare $(DATA_ARGS) --out $(OUT) $(ARGS)

# The library-only example (no harness): an MLP with NLCG against momentum SGD.
demo: install
	$(BIN)/python examples/fashion_mnist_demo.py $(if $(DATA_DIR),--data-dir $(DATA_DIR),) $(DEMO_ARGS)

lint: install-test
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# The developer's loop: everything but the tests marked slow (multi-process, end to end).
test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow"
