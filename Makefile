# Thin wrapper over install, demo, test, lint, bench. Every target installs first when needed.
PY ?= python3
VENV ?= .venv
# The CPU build of torch lies on this disk; a GPU user picks a CUDA build, e.g.
#   make install TORCH="torch==2.13.0" PIP_EXTRA="--index-url <your CUDA wheel index>"
TORCH ?= torch==2.13.0
PIP_EXTRA ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-long soak clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_EXTRA) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m p2p_trainer.demo

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench.run

bench-long: install
	$(BIN)/python -m bench.run --long

soak: install
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
