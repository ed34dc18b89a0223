# Strata: `make run` serves on 127.0.0.1:8000; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.yaml
# The torch build: 2.13.0 is a CPU build where a local wheel exists (CI), a CUDA
# build from PyPI on a GPU box. Override with TORCH_SPEC='torch==X' if needed.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test install install-test tiny-models browser bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes. `remote-code` is what the
# published BiRefNet/RMBG-2.0 code imports. PyPI's torchvision is built against PyPI's
# torch: beside a torch from elsewhere (a CPU build from a local wheel) it cannot import,
# and transformers would then fail wherever it imports it, so it is removed (with timm,
# which needs it) and those models fall back to classic, saying why.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[models,remote-code]'
	@$(BIN)/python -c 'import torchvision.ops, timm' 2>/dev/null || { \
	  $(BIN)/pip uninstall --quiet -y torchvision timm; \
	  echo "torchvision from PyPI does not run with this torch ($$($(BIN)/python -c 'import torch; print(torch.__version__)')): removed it and timm."; \
	  echo "BiRefNet and RMBG-2.0 need them: install the torchvision built for this torch, e.g. from https://download.pytorch.org/whl/cpu"; }
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/python -m serve_app.run $(CONFIG)

tiny-models: install
	$(BIN)/python scripts/make_tiny_models.py

browser:
	scripts/install_browser.sh

test: install-test tiny-models browser
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

# The quick benchmark (under 3 minutes on 2 cores); the full one: $(BIN)/python scripts/bench.py
bench: install
	$(BIN)/python scripts/bench.py --quick

clean:
	rm -rf $(VENV) models/tiny
