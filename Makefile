# The README's two commands: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-gpu lint format bench clean

$(VENV)/.installed: pyproject.toml scripts/setup-venv.sh
	VENV=$(VENV) ./scripts/setup-venv.sh

demo: $(VENV)/.installed
	$(VENV)/bin/segscale demo

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=20

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(VENV)/.installed
	@echo "benchmarks/ scripts print ratios; run them one by one, e.g. $(PY) benchmarks/<name>.py"

clean:
	rm -rf runs build dist src/*.egg-info .pytest_cache .ruff_cache
