"""Shared fixtures: the tiny pipeline saved to disk once, a server app built on it, diffusers' own pipeline on the
same weights, and the validation tools. Shared functions live in ``predictor.testing``."""

from __future__ import annotations

import sys

# kserve.model_server parses sys.argv when imported; keep pytest's own arguments away from it.
_argv, sys.argv = sys.argv, sys.argv[:1]
import kserve.model_server  # noqa: E402, F401

sys.argv = _argv

import os  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from predictor.builtin import build_tiny, build_tiny_sd2, build_tiny_sdxl  # noqa: E402
from predictor.logs import install_log_filters  # noqa: E402
from predictor.model import DiffusionModel  # noqa: E402
from predictor.server import PredictorServer  # noqa: E402
from predictor.testing import make_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

install_log_filters()  # the same third-party noise filtered as in the server process

# The files that take longest (a minute or more each) run first: under `make test`'s workers, a file to a worker in
# this order, the last files to start are short ones and the workers finish together.
LONGEST_FIRST = ("test_gpu_suite.py", "test_server_process.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each file, and of the other files, stays as collected


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:tiny written with save_pretrained, so tests load it through the real loader."""
    directory = tmp_path_factory.mktemp("tiny-sd")
    build_tiny().save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:tiny-sdxl on disk, for the real loader."""
    directory = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl().save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:tiny-sd2 (v-prediction) on disk, for the real loader."""
    directory = tmp_path_factory.mktemp("tiny-sd2")
    build_tiny_sd2().save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def settings(tiny_model_dir: Path):
    return make_settings(tiny_model_dir, "--default_steps", "4", "--max_batch_instances", "4")


@pytest.fixture(scope="session")
def model(settings) -> Iterator[DiffusionModel]:
    model = DiffusionModel(settings)
    model.load()
    yield model
    model.stop()


@pytest.fixture(scope="session")
def client(model: DiffusionModel, settings) -> Iterator[TestClient]:
    server = PredictorServer(settings, http_port=0, grpc_port=0, enable_grpc=False)
    app = server.create_app(model)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def reference_pipe(tiny_model_dir: Path):
    """diffusers' own pipeline on the same weights: the ground truth for equivalence."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str], str]:
    """Finds a validation tool in the tools venv (.tools, made by `make test`) or on PATH; under CI a missing tool
    fails the test, elsewhere it skips it."""

    def find(name: str) -> str:
        local = ROOT / ".tools" / "bin" / name
        path = str(local) if local.exists() else shutil.which(name)
        if path is None:
            if os.environ.get("CI"):
                pytest.fail(f"{name} is missing: `make test` installs it into .tools")
            pytest.skip(f"{name} not installed (`make test` installs it into .tools)")
        return path

    return find
