# `make demo` and `make test` each create .venv if missing and install the pinned set.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export RAY_TRAIN_ENABLE_PRINT_PATCH ?= 0
export RAY_DEDUP_LOGS ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-fast lint ui bench clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/sprout compare configs/digits.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python tests/lanes.py -q $(if $(CI),--hypothesis-seed=0)

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not ray"

lint: $(STAMP)
	$(BIN)/ruff check .

ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

bench: $(STAMP)
	$(BIN)/python benchmarks/step_cost.py --model small_cnn --dataset digits
	$(BIN)/python benchmarks/step_cost.py --model vgg16 --image-size 32

clean:
	rm -rf ray_results mlflow.db mlruns .pytest_cache
