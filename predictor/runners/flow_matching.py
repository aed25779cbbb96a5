"""What the flow-matching transformer families (FLUX, SD3) share: schedulers from the flow-matching registry,
schedules set as the family's pipeline sets them (pipeline.set_timesteps), no ``scale_model_input`` (their
pipelines call none), and an adapter that lets the engine call a transformer as it calls a UNet."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from predictor.pipeline import make_scheduler
from predictor.runners.base import DenoiseWork
from predictor.runners.latent import LatentRunner
from predictor.schemas import GenerationParams


class TransformerCall(torch.nn.Module):
    """A transformer called as ``(sample, timesteps, **conditioning)``: ``call`` maps that onto the model's own
    keywords. A module, so torch.compile traces the mapping with the model."""

    def __init__(self, transformer: torch.nn.Module, call: Callable[..., Any]) -> None:
        super().__init__()
        self.transformer = transformer
        self._call = call

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, return_dict: bool = False, **inputs: Any) -> Any:
        return self._call(self.transformer, sample, timesteps, **inputs)


class FlowMatchingRunner(LatentRunner):
    # By reading FlowMatchEulerDiscreteScheduler.step: it indexes its sigmas with a host integer and never reads a
    # value back (bench/gpu_check.py measures it on a GPU).
    host_free_schedulers = frozenset({"euler"})

    def batch_key(self, params: GenerationParams) -> Hashable:
        return (params.height, params.width)

    def make_scheduler(self, name: str) -> SchedulerMixin:
        return make_scheduler(name, self.pipe.scheduler.config, flow_matching=True)

    def model_input(self, work: DenoiseWork, t: torch.Tensor) -> torch.Tensor:
        return work.latents

    def set_first_step(self, scheduler: SchedulerMixin) -> None:
        # FLUX's pipeline starts at index 0 (set_begin_index(0)). A lookup would start at 1 when a strong shift
        # makes the first integer timesteps equal (FLUX.1-dev at 2048 px and 40+ steps with dpmpp_2m), and the
        # job would fail at its last step; SD3's pipeline fails there itself, and from 0 the job completes.
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
