# Two entry points a newcomer needs: `make demo` (set up + run the default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROMPT ?= Explain self-attention in two sentences.
# llama-cpp-python (the `bench` extra) compiles llama.cpp from source: for this machine's CPU, without the
# multimodal library that nothing here uses (about 11 minutes on 2 cores, once per venv).
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF

.PHONY: demo test setup setup-test bench lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"   # the CPU build; an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install -q -e .
	touch $@

# The test setup includes the bench extra, so the llama.cpp tests (peer, --export-gguf) run in CI too.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) install -q -e ".[bench]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: setup
	$(VENV)/bin/leanlm generate --chat "$(PROMPT)" --max-tokens 96 --temperature 0

# pytest exits 5 when it collects no tests; treat that as a failure of the setup, not as success.
test: setup-test
	$(PY) -m pytest -q -ra

lint: setup-test
	$(VENV)/bin/ruff check leanlm tests benchmarks

bench: setup-test
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
