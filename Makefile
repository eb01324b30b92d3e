# Quick start: `make demo` runs the demo on the bundled LIDC sample, `make test` runs the tests.
# Both create ./.venv (unless a virtual environment is active) with the torch/torchvision pair pinned
# in constraints.txt, and install this package into it.
SHELL := /bin/bash
PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.nnunet_arseg_installed

.PHONY: install test demo

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/nnUNetv2_arseg_demo $(if $(OUT),$(OUT),arseg_demo)
