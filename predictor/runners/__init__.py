"""Model runners: one module per model family, each a ``ModelRunner`` (see base.py)."""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from predictor.config import EngineConfig
from predictor.pipeline import LoadedPipeline
from predictor.runners.base import ModelRunner
from predictor.runners.stable_diffusion import StableDiffusionRunner

# Pipeline class -> the runner that serves it. A new family adds its runner here and nowhere else.
RUNNERS: dict[type, type[ModelRunner]] = {StableDiffusionPipeline: StableDiffusionRunner}


def make_runner(loaded: LoadedPipeline, config: EngineConfig) -> ModelRunner:
    for pipeline_class, runner_class in RUNNERS.items():
        if isinstance(loaded.pipe, pipeline_class):
            return runner_class(loaded, config)
    raise TypeError(f"no runner serves {type(loaded.pipe).__name__}")


__all__ = ["RUNNERS", "ModelRunner", "make_runner"]
