# Thin wrappers around `shortcut-study`; see README.md. Every variable can be overridden:
#   make train PRESET=best EPOCHS=40      make sweep N_TRIALS=10
SHELL := /bin/bash
# A `pip install --user uv` lands here; found by the targets below on a fresh machine.
export PATH := $(HOME)/.local/bin:$(PATH)
UV ?= uv
# Bytecode compiled at install (by every uv sync, `uv run`'s too): these machines set
# PYTHONDONTWRITEBYTECODE, so without it each process compiles torch's sources again — ~9 s of every
# command's start and of each subprocess a test spawns (measured: `data build` of 90 images 15 s -> 6 s).
export UV_COMPILE_BYTECODE := 1
RUN = $(UV) run --frozen
SS = $(RUN) shortcut-study
# Every target that runs Python depends on this stamp: uv and the locked environment, installed once.
VENV := .venv/.synced-uv-lock

SHARED ?= ../shared/datasets
CIFAR_TGZ := $(wildcard $(SHARED)/cifar10-images.tar.gz)
MNIST_TGZ := $(wildcard $(SHARED)/mnist-images.tar.gz)
# Offline here: the archives in ../shared; elsewhere torchvision downloads (with checksums).
CIFAR_SRC ?= $(if $(CIFAR_TGZ),$(CIFAR_TGZ),data/sources/cifar10)
MNIST_SRC ?= $(if $(MNIST_TGZ),$(MNIST_TGZ),data/sources/mnist)
DOWNLOAD ?= $(if $(and $(CIFAR_TGZ),$(MNIST_TGZ)),,--download)

DATA ?= data/course
PRESET ?= default
RUN_DIR ?= experiments/runs/$(PRESET)
EPOCHS ?=
EPOCH_ARG := $(if $(EPOCHS),--epochs $(EPOCHS),)

.PHONY: all setup data train predict evaluate test bench bench-quick methods sweep best report ui server clean \
  compare compare-quick benchmark benchmark-quick submission

all: setup data train predict evaluate

setup: $(VENV)
$(VENV): pyproject.toml uv.lock
	@command -v $(UV) >/dev/null 2>&1 || python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $@

data: $(DATA)/metadata.csv
$(DATA)/metadata.csv: | $(VENV)
	$(SS) data build --cifar $(CIFAR_SRC) --mnist $(MNIST_SRC) --out $(DATA) $(DOWNLOAD)

train: data
	$(SS) train --data $(DATA) --out $(RUN_DIR) --preset $(PRESET) $(EPOCH_ARG)

predict: $(VENV)
	$(SS) predict --checkpoint $(RUN_DIR)/q1_model.pt --images $(DATA)/test_unlabeled --out $(RUN_DIR)/q1_test.txt

evaluate: $(VENV)
	$(SS) evaluate --predictions $(RUN_DIR)/q1_test.txt --labels $(DATA)/test_labels.csv

# Two test processes (pytest-xdist; work-stealing, as the tests' lengths differ by 100x): many tests
# wait on subprocesses, heartbeats and grace periods, so the other process's tests fill those waits.
TEST_PROCS ?= 2
test: $(VENV)
	$(RUN) pytest -W ignore::DeprecationWarning -n $(TEST_PROCS) --dist worksteal

bench: data
	$(SS) bench --data $(DATA) --md results/bench.md --results results

bench-quick: data
	$(SS) bench --data $(DATA) --quick

# Every debiasing method on one recipe (preset `methods`, no digit shuffle): results/methods.md.
methods: data
	$(SS) bench --methods --data $(DATA) --md results/methods.md

clean:
	rm -rf experiments/runs .pytest_cache

# ---- the study ---------------------------------------------------------------------------------
STUDY ?= shortcut
N_TRIALS ?= 24
SWEEP_TIMEOUT ?= 2400
SWEEP_ARGS ?=
WORKERS ?= 1
TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns/mlflow.db
STORAGE ?= sqlite:///$(CURDIR)/studies/optuna.db
UI_PORT ?= 5000
RESULTS ?= results

sweep: data $(VENV)
	$(SS) sweep --data $(DATA) --study $(STUDY) --n-trials $(N_TRIALS) --timeout $(SWEEP_TIMEOUT) \
	  --storage $(STORAGE) --tracking-uri $(TRACKING_URI) --workers $(WORKERS) $(SWEEP_ARGS)

best: $(VENV)
	$(SS) best --data $(DATA) --study $(STUDY) --storage $(STORAGE) --tracking-uri $(TRACKING_URI) --out $(RESULTS)

# The shortcut-strength study: a grid of cells (experiments/compare.toml), each a trial in the
# sweep's storage; several processes (WORKERS, or other hosts with STORAGE) share it. Tables and
# plots go to results/compare/.
GRID ?= experiments/compare.toml
COMPARE_ARGS ?=
COMPARE_OUT ?= $(RESULTS)/compare
compare: $(VENV)
	$(SS) compare --grid $(GRID) --cifar $(CIFAR_SRC) --mnist $(MNIST_SRC) $(DOWNLOAD) --storage $(STORAGE) \
	  --tracking-uri $(TRACKING_URI) --workers $(WORKERS) --out $(COMPARE_OUT) $(COMPARE_ARGS)

compare-quick: GRID = experiments/compare-quick.toml
compare-quick: COMPARE_OUT = $(RESULTS)/compare-quick
compare-quick: compare

# Every method tuned alike (experiments/benchmark.toml), then seeds of each choice; WORKERS, or
# other hosts with STORAGE, share it. A part: BENCHMARK_ARGS="--set seeds=0 --part mine".
SPEC ?= experiments/benchmark.toml
BENCHMARK_ARGS ?=
BENCHMARK_OUT ?= $(RESULTS)/benchmark
benchmark: data $(VENV)
	$(SS) benchmark --spec $(SPEC) --data $(DATA) --storage $(STORAGE) --tracking-uri $(TRACKING_URI) \
	  --workers $(WORKERS) --out $(BENCHMARK_OUT) $(BENCHMARK_ARGS)

benchmark-quick: SPEC = experiments/benchmark-quick.toml
benchmark-quick: BENCHMARK_OUT = $(RESULTS)/benchmark-quick
benchmark-quick: benchmark

# A team's PostgreSQL (Optuna storage) + MLflow tracking server; prints the URLs workers pass.
SERVER_HOST ?= 127.0.0.1
server: $(VENV)
	$(SS) server --root studies --host $(SERVER_HOST)

ui: $(VENV)
	$(SS) ui --tracking-uri $(TRACKING_URI) --artifacts $(CURDIR)/mlruns/artifacts --port $(UI_PORT)

# The course's folder NAME_project_2/ (code/ + results/) from results/ (what `make best` exported).
NAME ?=
submission: $(VENV)
	$(SS) submission --name "$(NAME)" --results $(RESULTS) --data $(DATA)

report: $(VENV)
	$(SS) report --data $(DATA) --study $(STUDY) --storage $(STORAGE) --tracking-uri $(TRACKING_URI) --out $(RESULTS)
