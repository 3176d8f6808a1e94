# Two commands are the whole set-up (README): `make train` and `make test`.
# Both create .venv on first use (Python 3.11 + pip, no conda) and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
UV_PIN := uv==0.13.9
# Extra MLflow Project parameters: make train P="epochs=2 max_train_samples=2000"
P ?=

export NO_ALBUMENTATIONS_UPDATE := 1
export MLFLOW_DISABLE_TELEMETRY := true
# The entry point command in MLproject calls `python`: make it the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
# Bytecode is cached (in __pycache__/, ignored by git) even where the environment asks not to: the suite starts
# ~150 Python processes, and each would compile the project's modules again (and pytest its rewritten tests).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: venv system-packages train style lint check test coverage clean

venv: $(STAMP)

# pip installs uv (pinned), and uv the project's pins: the same packages as `pip install -e '.[test]'` (checked
# with pip freeze), in ~4 s from uv's cache or ~25 s from PyPI, where pip takes ~75 s plus ~30 s to compile every
# module to bytecode. uv compiles nothing: each module is compiled once, by the first process that imports it
# (~5,000 of the ~16,000 installed, ~17 CPU-s).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(UV_PIN)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[test]'
	touch $(STAMP)

# The tracking store first, one process at a time (cifar_mlflow.tracking.store.check_tracking_server locks a new sqlite
# file while MLflow creates it): two `mlflow run`s started at once into an empty folder would both run MLflow's
# table creation, and one would die.
train: $(STAMP)
	$(BIN)/python -c 'from cifar_mlflow.tracking.store import check_tracking_server; check_tracking_server()'
	$(BIN)/mlflow run . --env-manager local $(foreach p,$(P),-P $(p))

# Debian's chromium and postgresql, which the UI and team-server tests drive (installed only if missing).
system-packages:
	bash scripts/system-packages.sh

# ruff (lint + format check) and the generated MLproject and docs/ parameter tables: seconds.
style: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/gen_params.py --check

# style, then mypy (~35 s of one core with a cold cache, a few seconds with its cache).
lint: style
	$(BIN)/mypy

# The fast loop while working: lint, the tests not marked slow and one end-to-end smoke (tests/conftest.py).
check: lint
	$(BIN)/python -m pytest -m "not slow" --durations=10

# The whole suite (what CI runs) with all of lint: style first, mypy beside the suite rather than before it (with a
# cold cache it keeps one core busy for ~35 s while the other would wait). Its report follows the suite's; either
# failing fails the target.
test: style system-packages
	@echo "$(BIN)/mypy > $(VENV)/mypy.log (beside the suite; its report after the suite's)"
	@$(BIN)/mypy > $(VENV)/mypy.log 2>&1 & types=$$!; \
	$(BIN)/python -m pytest; suite=$$?; \
	wait $$types; typed=$$?; cat $(VENV)/mypy.log; \
	exit $$(( suite != 0 || typed != 0 ))

# The whole suite with line coverage of cifar_mlflow/ and entrypoints/ (children included): the figure issue 24 keeps.
coverage: $(STAMP) system-packages
	rm -f .coverage .coverage.*
	COVERAGE_FILE=$(abspath .coverage) $(BIN)/python -m pytest --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .coverage .coverage.* htmlcov
