# The project's own environment and its two jobs. README.md documents `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed

.PHONY: demo test build clean

demo: build
	$(BIN)/python -m legw_fused demo

test: build
	$(BIN)/python -m pytest -q

# Compiles legw_fused._C in place (incremental: ninja keeps objects under build/).
build: $(DEPS)
	$(BIN)/pip install --no-build-isolation --no-deps -e .

$(DEPS): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt
	touch $@

clean:
	rm -rf build legw_fused/_C*.so *.egg-info
