# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
# torch is pinned to the CPU wheel that lies on this machine's disk; an unpinned torch pulls a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,demo]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m strassenkit demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m strassenkit bench

clean:
	rm -rf $(VENV) .pytest_cache
