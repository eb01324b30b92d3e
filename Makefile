# Quick start: `make demo` runs the demo on the bundled LIDC sample, `make test` runs the tests.
# Both create ./.venv with the torch/torchvision pair pinned in constraints.txt and install this package into it.
# An active virtual environment that this Makefile did not create is left alone: make refuses to force pinned
# versions into it unless asked (`make test USE_ACTIVE_VENV=1`); `pip install .` installs without the pins.
SHELL := /bin/bash
PYTHON ?= python3
CREATED_MARK := .created_by_nnunet_arseg_make
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.nnunet_arseg_installed

.PHONY: install test demo check-venv

check-venv:
	@if [ -n "$(VIRTUAL_ENV)" ] && [ ! -e "$(VENV)/$(CREATED_MARK)" ] && [ -z "$(USE_ACTIVE_VENV)" ]; then \
	  echo "make: the active virtual environment $(VENV) was not created by this Makefile; installing would pin" \
	       "$$(grep -v '^#' constraints.txt | paste -sd ' ') into it." >&2; \
	  echo "  Deactivate it to use ./.venv, or accept the pins with 'make $(MAKECMDGOALS) USE_ACTIVE_VENV=1'," \
	       "or install without them: pip install -e '.[test]'." >&2; \
	  exit 2; \
	fi

$(STAMP): pyproject.toml constraints.txt | check-venv
	@test -x $(BIN)/python || { $(PYTHON) -m venv $(VENV) && touch $(VENV)/$(CREATED_MARK); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests --durations=25

demo: $(STAMP)
	$(BIN)/nnUNetv2_arseg_demo $(if $(OUT),$(OUT),arseg_demo)
