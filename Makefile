# make demo / make test are the only commands a newcomer needs; both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# example plugin distributions, installed like the plugins; their tests run in `make test`
EXAMPLE_PLUGINS := examples/clipft-bitfit/pyproject.toml
# torch 2.14.1 / torchvision 0.29.1 are the releases this project is pinned to test
# against; installing them first keeps pip from resolving a newer multi-GB wheel.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS) $(EXAMPLE_PLUGINS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]' $(foreach p,$(PLUGINS) $(EXAMPLE_PLUGINS),-e $(dir $(p)))
	touch $(STAMP)

demo: install
	CLIPFT_DEMO=1 $(BIN)/clipft run --config examples/configs/demo.toml --out runs/demo --overwrite

test: install
	$(BIN)/python -m pytest tests examples/clipft-bitfit/tests

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs
