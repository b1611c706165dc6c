# Two commands on a fresh Debian/Ubuntu machine (Python >= 3.10 with venv):
#   make run    — create .venv, install medqc, start the agent with the bundled model on the CPU
#   make test   — install the test extras (PyTorch CPU included) and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# an editable install makes setuptools print an information-only note ("Editable installation. Please be
# careful with folders in your working directory..."): not a problem here, and the only thing it would print
PIP_INSTALL := PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(BIN)/pip install -q

.PHONY: run test install install-dev bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev: $(BIN)/python pyproject.toml
	$(PIP_INSTALL) "$(TORCH)" -e ".[train,test]"
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: $(VENV)/.runtime
	$(BIN)/medqc agent

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(BIN)/medqc bench --out bench/results

clean:
	rm -rf $(VENV) build dist *.egg-info medqc-state
