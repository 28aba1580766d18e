# Thin wrapper over install, demo, test, lint, bench. Every target installs first when needed.
PY ?= python3
VENV ?= .venv
# The CPU build of torch lies on this disk; a GPU user picks a CUDA build, e.g.
#   make install TORCH="torch==2.13.0" PIP_EXTRA="--index-url <your CUDA wheel index>"
TORCH ?= torch==2.13.0
PIP_EXTRA ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test-tools demo test lint bench bench-long soak clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_EXTRA) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m p2p_trainer.demo

# what some tests need from the system, installed when we are root and it is missing: iptables for
# the NAT lab in network namespaces, Chromium for the status page (each test skips, saying why,
# where it cannot be had)
test-tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=""; \
		command -v iptables >/dev/null || missing="$$missing iptables"; \
		command -v chromium >/dev/null || missing="$$missing chromium"; \
		if [ -n "$$missing" ]; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
				|| echo "could not install$$missing: the tests that need it will be skipped"; \
		fi; \
	fi

test: install test-tools
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

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
