# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reconkit-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/reconkit demo --output demo_output

test: install
	$(PY) -m pytest -q src tests

lint: install
	$(PY) -m pip install -q "ruff>=0.13"
	$(VENV)/bin/ruff check src tests benchmarks data_scripts

bench: install
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
