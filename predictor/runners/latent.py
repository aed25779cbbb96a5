"""What every latent-diffusion family shares once its prompts are encoded: the (compiled or eager) denoiser and
VAE decoder calls, the float32 VAE fallback, and ``--compile``.

A family's runner says which module denoises (the UNet, or an adapter over a transformer that takes the
engine's ``(sample, timesteps, **conditioning)`` call), the shape of one row at the native size, and example
inputs to compile with; ``LatentRunner`` does the rest.
"""

from __future__ import annotations

import copy
import logging
import time
from abc import abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from predictor.config import EngineConfig
from predictor.jobs import Job
from predictor.pipeline import LoadedPipeline
from predictor.request import GenerationParams
from predictor.runners.base import Conditioning, ModelRunner
from predictor.runners.compiled import CompiledDecoder, CompiledDenoiser, compile_cache_counts, compile_phases

logger = logging.getLogger(__name__)


def _one_by_one(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode image by image in half precision, as a lone pipeline call does: there a batched VAE call sums in
    another order and moved pixels by 2 to 6 grey levels (bfloat16, measured), and on a GPU the decode is a small,
    compute-bound part of an image's cost. float32 decodes in one call (within a grey level, and cheaper on CPUs)."""
    if latents.dtype == torch.float32:
        return vae.decode(latents, return_dict=False)[0]
    return torch.cat([vae.decode(latents[i : i + 1], return_dict=False)[0] for i in range(len(latents))])


def posteriors(vae: Any, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, std) of the VAE encoder's posterior for each image: one call in float32, image by image in half
    precision, where a batched call sums in another order than diffusers' one-image call (as for the decode)."""
    if images.dtype == torch.float32:
        posterior = vae.encode(images).latent_dist
        return [(posterior.mean[i : i + 1], posterior.std[i : i + 1]) for i in range(len(images))]
    return [(p.mean, p.std) for p in (vae.encode(images[i : i + 1]).latent_dist for i in range(len(images)))]


class LatentRunner(ModelRunner):
    def __init__(self, loaded: LoadedPipeline, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        self._compiled: Any = None  # a CompiledDenoiser once warmed up with --compile
        self._decoder: Any = None  # a CompiledDecoder once warmed up with --compile
        self._vae_float32: Any = None  # made on the first float16 overflow
        self.vae: Any = loaded.pipe.vae  # the VAE this runner decodes with (SDXL's may be a float32 copy)
        self._preview_map: tuple[torch.Tensor, torch.Tensor] | None = None  # fitted on the first preview

    # ---- what a family defines ----------------------------------------------------------------

    @property
    @abstractmethod
    def denoiser_module(self) -> torch.nn.Module:
        """The module called as ``(sample, timesteps, **conditioning, return_dict=False)[0]``."""

    @property
    @abstractmethod
    def latent_dtype(self) -> torch.dtype:
        """The dtype diffusers draws the latents in (its prompt embeddings' dtype)."""

    @abstractmethod
    def native_row_shape(self) -> tuple[int, ...]:
        """One row's sample shape (no batch dimension) at the native size: what compiled graphs are made for."""

    @abstractmethod
    def example_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(sample, timesteps, conditioning) of ``rows`` rows at the native size, to compile with before serving."""

    # ---- img2img and inpainting: what every family shares ------------------------------------------

    @property
    def blends_inpainting(self) -> bool:
        """Whether this model inpaints by putting the noised picture back outside the mask after every step (any
        denoiser without mask channels)."""
        return True

    def renoise(
        self, scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """A picture's latents noised to ``timestep``: ``add_noise`` (UNet families), ``scale_noise`` (FLUX, SD3)."""
        return scheduler.add_noise(latents, noise, timestep)

    @staticmethod
    def by_output_size(jobs: list[Job]) -> dict[tuple[int, int], list[Job]]:
        """Image jobs grouped by output size: one VAE encoder pass each."""
        groups: dict[tuple[int, int], list[Job]] = {}
        for job in jobs:
            groups.setdefault((job.params.height, job.params.width), []).append(job)
        return groups

    def advance(self, job: Job, noise: torch.Tensor) -> None:
        super().advance(job, noise)
        work = job.work
        if "image_latents" not in work.inputs:
            return
        # Inpainting without mask channels: the picture, noised to the next step, goes back outside the mask. After
        # a step the schedulers read their step index, not the timestep's value, so the device slice serves (the
        # pipelines pass torch.tensor([timesteps[i + 1]])) without a copy to the host.
        kept = work.inputs["image_latents"]
        step = job.steps_done - 1
        if step < len(work.timesteps) - 1:
            kept = self.renoise(work.scheduler, kept, work.inputs["noise"], work.timesteps[step + 1 : step + 2])
        mask = work.inputs["mask"]
        work.latents = (1 - mask) * kept + mask * work.latents

    def leaves_host_free(self, params: Iterable[GenerationParams]) -> bool:
        # Blending inpainting noises the picture every step with the scheduler's host sigmas: the step waits.
        listed = list(params)
        blends = self.blends_inpainting and any(p.mode == "inpaint" for p in listed)
        return not blends and super().leaves_host_free(listed)

    def _scaled_for_vae(self, latents: torch.Tensor, dtype: torch.dtype, jobs: list[Job] | None = None) -> torch.Tensor:
        """Latents as the VAE decoder takes them, in ``dtype`` (FLUX's and SD3's VAEs also shift them)."""
        latents = latents.to(dtype) / self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)
        return latents if shift is None else latents + shift

    # ---- the runner hooks ------------------------------------------------------------------------

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if self._compiled is not None and tuple(sample.shape[1:]) == self.native_row_shape():
            return self._compiled(sample, timesteps, **conditioning)
        return self.denoiser_module(sample, timesteps, **conditioning, return_dict=False)[0]

    def decode(self, latents: torch.Tensor, jobs: list[Job] | None = None) -> torch.Tensor:
        scaled = self._scaled_for_vae(latents, self.vae.dtype, jobs)
        if self._decoder is not None and self._at_native_latent_size(latents):
            return self._decoder(scaled)
        return _one_by_one(self.vae, scaled)

    def decode_float32(self, latents: torch.Tensor, jobs: list[Job] | None = None) -> torch.Tensor:
        if self._vae_float32 is None:
            logger.warning("the float16 VAE overflowed; decoding such images in float32 from now on")
            self._vae_float32 = copy.deepcopy(self.vae).to(torch.float32)
        return _one_by_one(self._vae_float32, self._scaled_for_vae(latents, torch.float32, jobs))

    # ---- previews ----------------------------------------------------------------------------------

    def preview_pixels(self, jobs: list[Job]) -> torch.Tensor:
        """Each job's picture as it stands (uint8, n x H x W x 3, on the device): decoded by the tiny VAE when
        --preview_vae_dir names one (full size), else the latents through a linear map to RGB fitted to this
        model's own VAE (latent resolution), so a preview costs a matrix product, not a decode."""
        tiny = self.loaded.preview_vae
        if tiny is not None:
            # As diffusers decodes with a tiny VAE in the pipeline's place: its own scaling and shift (1 and 0 for
            # TAESD and its kin, whose decoders take the denoiser's latents as they are).
            latents = self.final_latents(jobs).to(tiny.dtype) / tiny.config.scaling_factor
            images = tiny.decode(latents + tiny.config.shift_factor, return_dict=False)[0]
            return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        if self._preview_map is None:
            self._preview_map = self._fit_preview_map()
        weights, bias = self._preview_map  # a fit that raised is retried at the next preview
        latents = self.final_latents(jobs).to(torch.float32)
        rgb = torch.einsum("bchw,cd->bhwd", latents, weights) + bias
        return (rgb.clamp(0, 1) * 255).round().to(torch.uint8)

    def _fit_preview_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Least squares from latents to the VAE's pictures averaged over each latent's pixels, on a few random
        latents (seeded): no extra weights, and the same for every family (FLUX's latents unpacked)."""
        vae, scale = self.vae, self.pipe.vae_scale_factor
        generator = torch.Generator("cpu").manual_seed(0)
        channels = vae.config.latent_channels
        latents = torch.randn((2, channels, 16, 16), generator=generator).to(self.device)
        images = vae.decode(self._scaled_for_vae(latents, vae.dtype), return_dict=False)[0].float()
        targets = torch.nn.functional.avg_pool2d((images / 2 + 0.5).clamp(0, 1), scale)  # (2, 3, 16, 16)
        inputs = latents.float().permute(0, 2, 3, 1).reshape(-1, channels)
        inputs = torch.cat([inputs, torch.ones(len(inputs), 1, device=inputs.device)], dim=1)
        outputs = targets.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(inputs.cpu(), outputs.cpu()).solution.to(self.device)
        logger.info("fitted the latent-to-RGB preview map to the VAE")
        return solution[:channels], solution[channels]

    # ---- --compile ---------------------------------------------------------------------------------

    def _at_native_latent_size(self, latents: torch.Tensor) -> bool:
        """Compiled graphs exist for the native resolution only; other sizes run eagerly rather than compile
        at request time (which would stall every request and, past dynamo's limit, fail)."""
        size = self.loaded.native_size // self.pipe.vae_scale_factor
        return tuple(latents.shape[-2:]) == (size, size)

    def warm_up(self) -> None:
        if self.config.compile:
            self._compile()

    def guided_rows(self) -> int:
        """Most denoiser rows one image can bring (two with classifier-free guidance)."""
        return 2

    def _compile(self) -> None:
        """torch.compile the denoiser and the VAE decoder, then run them so no request compiles or records a graph."""
        device, config = self.device, self.config
        started = time.perf_counter()
        # CUDA graphs replay fixed shapes; they exist on CUDA only.
        cuda_graphs = device.type == "cuda" and (
            config.compile_mode == "reduce-overhead" or config.compile_backend == "cudagraphs"
        )
        max_rows = self.guided_rows() * config.max_batch_size
        # Dynamo guards on requires_grad, and PEFT turns it off when it adds layers: off from the start.
        self.loaded.denoiser.requires_grad_(False)
        slots = None
        if self.adapters is not None:  # adapters in fixed slots, so loading one never changes a compiled module
            self.adapters.install_slots(self.loaded.denoiser, max_rows)
            slots = self.adapters.slots
        denoiser = CompiledDenoiser(self.denoiser_module, config, max_rows=max_rows, cuda_graphs=cuda_graphs)
        decoder = CompiledDecoder(self.vae.decode, config)
        denoiser_compile_s = denoiser_sizes_s = 0.0
        # With slots, the graphs with and without adapter rows (dynamo guards on ``active``), both before serving.
        for active in (False, True) if slots is not None else (False,):
            if slots is not None:
                slots.active = active
            compile_s, sizes_s = denoiser.warm_up(self.example_inputs, self._synchronize)
            denoiser_compile_s, denoiser_sizes_s = denoiser_compile_s + compile_s, denoiser_sizes_s + sizes_s
        if slots is not None:
            slots.active = False
        decoder_started = time.perf_counter()
        vae = self.vae
        size = self.loaded.native_size // self.pipe.vae_scale_factor
        decoder(torch.zeros((1, vae.config.latent_channels, size, size), device=device, dtype=vae.dtype))
        self._synchronize()
        finished = time.perf_counter()
        self._compiled, self._decoder = denoiser, decoder
        hits, misses = compile_cache_counts()
        logger.info(
            "compiled the %s (%s) and the VAE decoder in %.1f s (%s, mode %s; compile cache: %d hits, %d misses): "
            "denoiser %.1f s, %s %.1f s, VAE decoder %.1f s; %s",
            type(self.loaded.denoiser).__name__,
            denoiser.describe(),
            finished - started,
            config.compile_backend,
            config.compile_mode,
            hits,
            misses,
            denoiser_compile_s,
            "recording CUDA graphs" if denoiser.cuda_graphs else "running every batch size",
            denoiser_sizes_s,
            finished - decoder_started,
            compile_phases(),
        )

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
