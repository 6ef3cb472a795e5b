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

PIP := $(BIN)/pip --disable-pip-version-check --quiet --quiet

.PHONY: setup setup-dev setup-test demo demo-intro test lint bench-baselines gpu-kit clean

setup: $(VENV)/.installed

# The Python environment the demo needs (no system packages); the dev tools come with setup-dev, the test
# system packages with setup-test.
$(VENV)/.installed: pyproject.toml $(TORCH_CONSTRAINTS) scripts/setup-system.sh
	@bash scripts/setup-system.sh demo
	@echo "setting up $(VENV): torch (CPU build), FastAPI, FAISS (first time: a few minutes)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip
	@$(PIP) install -c $(TORCH_CONSTRAINTS) -e '.[$(FAISS_EXTRA)]'
	@touch $@

setup-dev: $(VENV)/.dev-installed

# pytest, selenium, ruff, mypy ...: the tests and the linters, not the demo.
$(VENV)/.dev-installed: $(VENV)/.installed
	@$(PIP) install -c $(TORCH_CONSTRAINTS) -e '.[dev,$(FAISS_EXTRA)]'
	@touch $@

# What only the tests need: the dev tools, Fashion-MNIST, and chromium + chromium-driver for the browser tests.
setup-test: setup-dev
	@bash scripts/setup-system.sh test

# The main job on the embedded default: `distill serve` (API + local worker, SQLite), POST /jobs for the headline
# method oq on MNIST at 10 images per class (500 training images per class seen), download the archive, and the
# server's evaluation of it against a random real subset of the same size.
demo: demo-intro setup
	@$(BIN)/python scripts/demo.py --method oq --dataset mnist --ipc 10 --max-per-class 500 \
		--out $(OUT)/mnist-oq-10.tar --evaluate --eval-runs 2 --eval-epochs 300 --eval-test-limit 2000

demo-intro:
	@echo "make demo: set up $(VENV) (first time only), start distill serve on loopback, distill MNIST to 10"
	@echo "images per class with oq (from 500 per class), download the archive, evaluate it on the server"
	@echo "against 10 random real images per class. On a quiet 2-core CPU about 12 minutes after the first"
	@echo "set-up; the server's estimate follows once the job is queued. One line per stage below."

test: setup-test
	bash scripts/run-tests.sh $(BIN)/python

lint: setup-dev
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
