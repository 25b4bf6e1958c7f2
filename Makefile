# Two commands do everything on a fresh machine with python3 and make: `make demo` and `make test`.
#
# TORCH picks the PyTorch build installed before the package:
#   CPU (default, CI):   make setup
#   CUDA GPU hosts:      make setup TORCH=torch          (PyPI's default Linux wheel is the CUDA build)
#   a specific CUDA:     make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.caries-mim-installed

.PHONY: setup demo study reference reference-cpu test lint format clean

# docker/constraints.txt pins the runtime dependencies to the versions the images install, so CI tests those.
$(STAMP): pyproject.toml docker/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]" --constraint docker/constraints.txt
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/caries-mim demo --out runs/demo

# Label-efficiency study on the demo's synthetic data, random init vs the shipped foundation encoder, with the
# demo's fine-tuning config at 800 steps per run, the same for every fraction (run `make demo` first; about an hour
# on 2 cores).
DEMO := runs/demo
study: setup
	@test -f $(DEMO)/demo_summary.json || { echo "make study needs the demo's data in $(DEMO): run make demo first"; exit 2; }
	@test -f models/foundation_encoder.pt || { echo "make study needs models/foundation_encoder.pt: run make reference-cpu"; exit 2; }
	$(BIN)/caries-mim study label-efficiency --config demo \
		--train $(DEMO)/synthetic/labeled/train.json --val $(DEMO)/synthetic/labeled/val.json \
		--test $(DEMO)/synthetic/labeled/test.json --encoder models/foundation_encoder.pt \
		--set data.cache_dir=$(DEMO)/decode_cache --set train.steps=800 --set eval.every=400 --out runs/study

# Rebuild the shipped foundation encoder and reference detector from scratch into models/ (resumable: run it again
# after an interruption). Hours on a GPU host, days on 2 CPU cores: see docs/detection_recipe.md.
reference: setup
	$(BIN)/caries-mim reference --out models --work runs/reference

# The same build sized for 2 CPU cores (about 100 minutes): what models/ ships until a GPU host runs `make reference`.
reference-cpu: setup
	$(BIN)/caries-mim reference --config cpu --out models --work runs/reference_cpu

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint --failure-threshold style docker/Dockerfile docker/Dockerfile.cpu

test: lint
	$(BIN)/python -m pytest

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
