# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# DISTILL_DATA_DIR / DISTILL_WEIGHTS_DIR must point at the data and weights (CI: ../shared/data, ../shared/weights).
PYTHON ?= python3
VENV ?= .venv
# CPU hosts pin the local CPU build of torch; GPU hosts run `make setup TORCH_CONSTRAINTS=constraints/gpu.txt`
# after installing their CUDA build of torch, which pip then keeps.
TORCH_CONSTRAINTS ?= constraints/cpu.txt
# FAISS comes as an extra (faiss-cpu and faiss-gpu install the same module): `gpu` with constraints/gpu.txt.
FAISS_EXTRA ?= $(if $(findstring gpu,$(TORCH_CONSTRAINTS)),gpu,cpu)
BIN := $(VENV)/bin
OUT ?= out

.PHONY: setup demo test lint bench-baselines gpu-kit clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(TORCH_CONSTRAINTS) scripts/setup-system.sh
	bash scripts/setup-system.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(TORCH_CONSTRAINTS) -e '.[dev,$(FAISS_EXTRA)]'
	touch $@

# The main job on the embedded default: `distill serve` (API + local worker, SQLite), POST /jobs for the headline
# method oq on MNIST at 10 images per class (500 training images per class seen), download the archive, evaluate it.
demo: setup
	$(BIN)/python scripts/demo.py --method oq --dataset mnist --ipc 10 --max-per-class 500 --out $(OUT)/mnist-oq-10.tar
	$(BIN)/distill eval $(OUT)/mnist-oq-10.tar --runs 2 --epochs 300 --test-limit 2000

test: setup
	bash scripts/run-tests.sh $(BIN)/python

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

bench-baselines: setup
	$(BIN)/python bench/baselines.py --epochs 300 --epochs-ipc50 100 --runs 2 --test-limit 2000

# The device kit for a lent GPU machine (bench/gpu_kit.py: wheels the image lacks + MNIST, in build/gpu-kit);
# the device call then runs `bash bench/gpu_run.sh` with build/gpu-kit carried.
gpu-kit: setup
	$(BIN)/python bench/gpu_kit.py

clean:
	rm -rf $(VENV) $(OUT)
