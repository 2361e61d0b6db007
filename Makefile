# hf-epic developer entry points. Each target creates (or reuses) the project-local
# virtual environment in .venv and installs the pinned, known-good versions first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hf-epic-installed
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c requirements/pinned.txt

.PHONY: install demo test test-all lint format bench clean

$(STAMP): pyproject.toml requirements/pinned.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing pinned torch/torchvision (CUDA builds, they run on CPU)"
	$(PIP) torch==2.14.1 torchvision==0.29.1
	@echo ">> installing hf-epic[dev,bench]"
	$(PIP) -e ".[dev,bench]"
	@touch $@

install: $(STAMP)

## The project's main job on its embedded offline default: fine-tune a ViT on a poisoned
## data set with EPIC, print the defense's table, write the model card and plots.
DEMO_OUT ?= outputs/finetune_vit
demo: $(STAMP)
	$(VENV)/bin/accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
		recipes/finetune_vit.py --output_dir $(DEMO_OUT)

## The test suite (what CI runs): lint, then every test not marked slow.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow and not gpu"

test-all: $(STAMP)
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
