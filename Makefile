# The project's own environment and its two jobs. README.md documents `make demo` and `make test`.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DEPS    := $(VENV)/.deps-installed
BUILT   := $(VENV)/.extension-built
# The editable install serves Python changes directly; only these need a rebuild of legw_fused._C.
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu') setup.py legw_fused/_build_config.py

.PHONY: demo test build clean

demo: build
	$(BIN)/python -m legw_fused demo

test: build
	$(BIN)/python -m pytest -q

build: $(BUILT)

$(BUILT): $(DEPS) $(SOURCES)
	$(BIN)/pip install --no-build-isolation --no-deps -e .
	touch $@

$(DEPS): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	touch $@

clean:
	rm -rf build legw_fused/_C*.so *.egg-info $(BUILT)
