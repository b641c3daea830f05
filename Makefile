PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint schema bench bench-full clean

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

# Every benchmark in bench/, one table at the end (bench/run_all.py). MODE=quick fits in a few
# minutes on 2 cores; MODE=full runs each script's defaults. The table also goes into
# BENCHMARKS.md's "latest" section (BENCH_MD= to leave the file alone); BENCH_ARGS passes
# more, e.g. BENCH_ARGS="--only jobs orchestrate" or "--st-python /tmp/st/bin/python".
MODE ?= quick
BENCH_MD ?= bench/BENCHMARKS.md
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python bench/run_all.py --mode $(MODE) $(if $(BENCH_MD),--markdown $(BENCH_MD)) $(BENCH_ARGS)

bench-full:
	$(MAKE) bench MODE=full

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
