# The two commands of the README: `make demo` and `make test`. Both build the venv from the lock first;
# the stamp makes a second run skip the install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench

venv: $(STAMP)

$(STAMP): requirements/cpu.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --no-deps -r requirements/cpu.lock
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation -e .
	$(BIN)/python -m lhf_torchrec.install_check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lhf demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/mapping.py
