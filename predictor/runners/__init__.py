"""Model runners: one module per model family, each a ``ModelRunner`` (see base.py)."""

from __future__ import annotations

from diffusers import (
    FluxPipeline,
    LatentConsistencyModelPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from predictor.config import EngineConfig
from predictor.pipeline import LoadedPipeline
from predictor.runners.base import ModelRunner
from predictor.runners.flux import FluxRunner
from predictor.runners.sd3 import StableDiffusion3Runner
from predictor.runners.stable_diffusion import StableDiffusionRunner
from predictor.runners.stable_diffusion_xl import StableDiffusionXLRunner

# Pipeline class -> the runner that serves it. A new family adds its runner here and in pipeline.FAMILIES.
RUNNERS: dict[type, type[ModelRunner]] = {
    StableDiffusionPipeline: StableDiffusionRunner,
    StableDiffusionXLPipeline: StableDiffusionXLRunner,
    StableDiffusionInpaintPipeline: StableDiffusionRunner,  # inpainting checkpoints: mask channels in the UNet
    StableDiffusionXLInpaintPipeline: StableDiffusionXLRunner,  # SDXL inpainting checkpoints, likewise
    LatentConsistencyModelPipeline: StableDiffusionRunner,  # its __call__ is SD's with the guidance embedded
    FluxPipeline: FluxRunner,
    StableDiffusion3Pipeline: StableDiffusion3Runner,
}


def make_runner(loaded: LoadedPipeline, config: EngineConfig) -> ModelRunner:
    for pipeline_class, runner_class in RUNNERS.items():
        if type(loaded.pipe) is pipeline_class:  # exact: a subclass may compute differently
            return runner_class(loaded, config)
    raise TypeError(f"no runner serves {type(loaded.pipe).__name__}")


__all__ = ["RUNNERS", "ModelRunner", "make_runner"]
