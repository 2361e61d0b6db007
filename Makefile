# hf-epic developer entry points. Each target creates (or reuses) the project-local
# virtual environment in .venv and installs the pinned, known-good versions first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hf-epic-installed
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c requirements/pinned.txt

.PHONY: install data compiler demo test test-all lint format bench clean

$(STAMP): pyproject.toml requirements/pinned.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing pinned torch/torchvision (CUDA builds, they run on CPU)"
	$(PIP) torch==2.14.1 torchvision==0.29.1
	@echo ">> installing hf-epic[dev,bench]"
	$(PIP) -e ".[dev,bench]"
	@touch $@

## Fashion-MNIST from Debian's package dataset-fashion-mnist (IDX files in $(FMNIST_DIR)): installed
## when missing and this is root with apt; otherwise a note says how to get it (--data_dir or the Hub).
FMNIST_DIR := /usr/share/datasets/fashion-mnist
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo ">> installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	else \
		echo "note: Fashion-MNIST is not in $(FMNIST_DIR) and this is not root with apt: install the Debian"; \
		echo "      package dataset-fashion-mnist, pass --data_dir with the IDX files, or use the Hub."; \
	fi

## A C compiler for the selection's C kernels (hf_epic/native.c): gcc is installed when none is found and
## this is root with apt; otherwise a note says that selection falls back to its torch kernels.
compiler:
	@if command -v $${CC:-cc} >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo ">> installing gcc (the selection's C kernels)"; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc libc6-dev >/dev/null; \
	else \
		echo "note: no C compiler found and this is not root with apt: selection uses its torch kernels"; \
		echo "      (same results, about 2x slower on large classes); install gcc or clang to speed it up."; \
	fi

install: $(STAMP) data compiler

## The project's main job on its embedded offline default: fine-tune a ViT on a poisoned
## data set with EPIC, print the defense's table, write the model card and plots.
DEMO_OUT ?= outputs/finetune_vit
demo: install
	$(VENV)/bin/accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
		recipes/finetune_vit.py --output_dir $(DEMO_OUT)

## The test suite (what CI runs): lint, then every test not marked slow.
test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow and not gpu"

test-all: install
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

## Performance benchmarks (minutes; print ratios against the reference run side by side).
bench: $(STAMP)
	$(PY) benchmarks/bench_selection.py
	$(PY) benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
