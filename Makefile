# Thin wrappers around `shortcut-study`; see README.md. Every variable can be overridden:
#   make train PRESET=best EPOCHS=40      make sweep N_TRIALS=10
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo uv)
RUN := $(UV) run --frozen
SS := $(RUN) shortcut-study

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

.PHONY: all setup data train predict evaluate test bench bench-quick sweep best report ui clean

all: setup data train predict evaluate

setup:
	@command -v $(UV) >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

data: $(DATA)/metadata.csv
$(DATA)/metadata.csv:
	$(SS) data build --cifar $(CIFAR_SRC) --mnist $(MNIST_SRC) --out $(DATA) $(DOWNLOAD)

train: data
	$(SS) train --data $(DATA) --out $(RUN_DIR) --preset $(PRESET) $(EPOCH_ARG)

predict:
	$(SS) predict --checkpoint $(RUN_DIR)/q1_model.pt --images $(DATA)/test_unlabeled --out $(RUN_DIR)/q1_test.txt

evaluate:
	$(SS) evaluate --predictions $(RUN_DIR)/q1_test.txt --labels $(DATA)/test_labels.csv

test:
	$(RUN) pytest -W ignore::DeprecationWarning

bench: data
	$(SS) bench --data $(DATA) --md results/bench.md --results results

bench-quick: data
	$(SS) bench --data $(DATA) --quick

clean:
	rm -rf experiments/runs .pytest_cache

# ---- the study ---------------------------------------------------------------------------------
STUDY ?= shortcut
N_TRIALS ?= 24
SWEEP_TIMEOUT ?= 2400
SWEEP_ARGS ?=
TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns/mlflow.db
STORAGE ?= sqlite:///$(CURDIR)/studies/optuna.db
UI_PORT ?= 5000

sweep: data
	$(SS) sweep --data $(DATA) --study $(STUDY) --n-trials $(N_TRIALS) --timeout $(SWEEP_TIMEOUT) \
	  --storage $(STORAGE) --tracking-uri $(TRACKING_URI) $(SWEEP_ARGS)

best:
	$(SS) best --data $(DATA) --study $(STUDY) --storage $(STORAGE) --tracking-uri $(TRACKING_URI) --out results

ui:
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)  (Ctrl-C stops it)"
	$(RUN) mlflow ui --backend-store-uri $(TRACKING_URI) --default-artifact-root $(CURDIR)/mlruns/artifacts \
	  --host 127.0.0.1 --port $(UI_PORT)

report:
	$(SS) report --data $(DATA) --study $(STUDY) --storage $(STORAGE) --tracking-uri $(TRACKING_URI) --out results
