# wavetrain developer commands. `make install` builds .venv with the CPU torch pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test test-fast bench train clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt "torch==$$(sed -n 's/^torch==//p' constraints.txt)"
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	@$(PY) -c "import torch, lightning, hydra; print('wavetrain installed: torch', torch.__version__, '| lightning', lightning.__version__)"

test:
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q

test-fast:
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q -m "not slow"

train:
	$(PY) -m wavetrain

# attention benchmark (tables + CSV + PNG under outputs/bench/); e.g. make bench BENCH_ARGS="--attention standard,wavefield"
bench:
	$(PY) -m wavetrain.bench $(BENCH_ARGS)

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
