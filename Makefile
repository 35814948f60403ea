PYTHON ?= python

.PHONY: install test test-fast bench-loss-memory

install:
	$(PYTHON) -m pip install -r requirements.txt -r requirements-test.txt
	$(PYTHON) -m pip install --no-deps -e .

test:
	$(PYTHON) -m pytest -q tests

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests

bench-loss-memory:
	$(PYTHON) benchmarks/loss_memory.py
