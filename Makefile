# Every target bootstraps .venv from nothing (tools/bootstrap.sh): python venv, pinned pip packages, and
# FFCV's system libraries through apt when they are missing and we are root.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 2
# One consistent PATH (the venv's ninja) so DeepSpeed's JIT-built ops are not rebuilt on every switch.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: all venv demo test test-slow bench clean

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/pinned.txt requirements/ffcv.txt requirements/test-nodeps.txt tools/bootstrap.sh
	VENV=$(VENV) bash tools/bootstrap.sh
	touch $@

demo: $(STAMP)
	$(PY) -m qpm_dist demo --nproc $(NPROC)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	bash bench/run.sh

clean:
	rm -rf $(VENV) runs bench/out .pytest_cache
