.PHONY: install test test-fast lint bench demo

install:
	python -m pip install torch==2.13.0 && python -m pip install -e ".[dev]"

test:
	python -m pytest -q

test-fast:
	python -m pytest -q -m "not slow"

lint:
	ruff check patcher kernels formats tests bench

bench:
	python bench/e2e.py

demo:
	patcher demo
