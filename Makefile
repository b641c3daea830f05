PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint schema bench clean

# The stamp is rebuilt whenever the dependency list changes. The venv holds the `local`
# extra (server, models, audio, MLX on the CPU) and the dev tools: scripts/bootstrap.sh.
$(STAMP): pyproject.toml scripts/bootstrap.sh scripts/repack_wheel.py
	PYTHON=$(PYTHON) sh scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/fusion serve --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(BIN)/python -m pip check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

schema: $(STAMP)
	$(BIN)/fusion schema --output schemas/workflow.schema.json

bench: $(STAMP)
	$(BIN)/python bench/engine_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
