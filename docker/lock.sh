#!/usr/bin/env bash
# Regenerate docker/requirements.lock: every runtime dependency pinned with hashes, for Linux x86_64,
# Python 3.11, with PyPI's CUDA build of torch. Run after changing pyproject.toml's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --constraint docker/constraints.txt --generate-hashes --no-annotate --quiet \
  -o docker/requirements.lock
