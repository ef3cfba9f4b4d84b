# wavetrain developer commands. `make install` builds .venv with the CPU torch pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test test-fast bench gpu-check train clean

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

# the GPU check of issue 15 on a CUDA machine: pytest -m cuda, then the GPU tables within ~5 min (suite.md, suite.csv,
# suite.png, tests.log, trainer_*.json/csv in OUT); e.g. make gpu-check OUT=$OUT PY=python3
gpu-check:
	$(PY) -m wavetrain.bench --suite gpu --out $(or $(OUT),outputs/gpu-check)

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
