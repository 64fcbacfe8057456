# Quick start: `make demo` and `make test`. Both create .venv when missing.
PY := .venv/bin/python
PIP := .venv/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test lint bench clean

setup: .venv/.installed
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium not installed: the browser test will be skipped"

# torch first, pinned, so pip never resolves a multi-GB CUDA build on a CPU-only machine.
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e '.[dev]'
	touch $@

demo: setup
	$(PY) -m autoq.demo

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check .

bench: setup
	$(PY) bench/formats_cpu.py
	$(PY) bench/search.py

clean:
	rm -rf .venv build *.egg-info
