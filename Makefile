# make demo / make test are the only commands a newcomer needs; both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# example plugin distributions, installed like the plugins; their tests run in `make test`
EXAMPLE_PLUGINS := examples/clipft-bitfit-example/pyproject.toml
# torch 2.14.1 / torchvision 0.29.1 are the releases this project is pinned to test
# against; installing them first keeps pip from resolving a newer multi-GB wheel.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo base test test-numerics bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS) $(EXAMPLE_PLUGINS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]' $(foreach p,$(PLUGINS) $(EXAMPLE_PLUGINS),-e $(dir $(p)))
	touch $(STAMP)

demo: install
	CLIPFT_DEMO=1 $(BIN)/clipft run --config examples/configs/demo.toml --out runs/demo --overwrite

# A "pretrained" tiny CLIP (shapes in four colours) for the README's walkthrough:
# runs/base (the run) and runs/base-export/open_clip_model.safetensors (the weights).
base: install
	$(BIN)/clipft run --config examples/configs/base.toml --out runs/base --overwrite
	$(BIN)/clipft export runs/base runs/base-export --overwrite

# lint-imports holds the layers in pyproject.toml ([tool.importlinter]); then
# two workers, one test file each at a time (module fixtures are built once per
# file); every torch test holds itself to one intra-op thread, so 2 cores stay 2
test: install
	$(BIN)/lint-imports
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile tests examples/clipft-bitfit-example/tests

# The numerically sensitive tests (marked numerics) again on other kernel paths:
# one OpenMP thread, MKL held to AVX2, and ATen's AVX2 kernels instead of AVX-512.
# A tolerance or an "improves" margin that holds on one CPU only fails here.
test-numerics: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -m numerics
	MKL_ENABLE_INSTRUCTIONS=AVX2 $(BIN)/python -m pytest tests -m numerics
	ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest tests -m numerics

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs
