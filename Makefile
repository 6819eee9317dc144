# `make demo` and `make test` install what they need into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast coverage lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/transfer sweep experiment=digits_transfer sweep=methods trainer.progress=none

# Two pytest workers (each test file stays on one, so its module fixtures are built once); every log ends
# with the 25 slowest tests.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The whole suite with line coverage of transfer_cli (in-process tests; subprocess runs are not traced).
coverage: $(STAMP)
	$(PYTEST) --cov=transfer_cli --cov-report=term:skip-covered --cov-report=html:outputs/coverage

lint: $(STAMP)
	$(BIN)/ruff check transfer_cli tests bench

# About 8 minutes on 2 cores; each script writes bench/results/<name>.csv/.md and prints its table.
# loop_ratio needs ../shared/datasets (MNIST, USPS); bench/gpu.sh is the GPU counterpart.
bench: $(STAMP)
	cd bench && $(abspath $(BIN))/python startup.py
	cd bench && $(abspath $(BIN))/python data_path.py
	cd bench && $(abspath $(BIN))/python loop_ratio.py
	cd bench && $(abspath $(BIN))/python sweep_parallel.py --epochs 40

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
