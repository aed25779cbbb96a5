"""Shared fixtures: the tiny pipeline saved to disk once, a server app built on it, a diffusers reference."""

from __future__ import annotations

import sys

# kserve.model_server parses sys.argv when imported; keep pytest's own arguments away from it.
_argv, sys.argv = sys.argv, sys.argv[:1]
import kserve.model_server  # noqa: E402, F401

sys.argv = _argv

import io  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from predictor.builtin import build_tiny  # noqa: E402
from predictor.config import parse_settings  # noqa: E402
from predictor.model import DiffusionModel  # noqa: E402
from predictor.server import PredictorServer  # noqa: E402

MODEL_NAME = "sd"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:tiny written with save_pretrained, so tests load it through the real loader."""
    directory = tmp_path_factory.mktemp("tiny-sd")
    build_tiny().save_pretrained(directory, safe_serialization=True)
    return directory


def make_settings(model_dir: Path | str, *extra: str):
    _, settings = parse_settings(
        ["--model_name", MODEL_NAME, "--model_dir", str(model_dir), "--model_id", "not/used", *extra]
    )
    return settings


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


def decode_image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
