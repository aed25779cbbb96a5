"""The model-agnostic runner: everything that touches torch, for any family.

The engine's loop asks a runner for five things, always on the worker thread: ``prepare`` new jobs,
``predict_noise`` for a batch (one denoiser call over all its rows, each at its own timestep), ``advance`` each
job's own scheduler, ``start_decode`` finished jobs and ``finish_decode`` them into pictures.

``DiffusionRunner`` does what every family shares: a scheduler and a seeded generator per job, classifier-free
guidance rows, per-row conditioning as a dict of tensors concatenated key by key, inpainting's blend, LoRA rows, the
(compiled or eager) denoiser and VAE decoder calls, the float32 VAE fallback, the asynchronous copy of pixels to
the host, the NaN check, previews, and on CUDA the preparation stream. What differs between pipelines it asks the
family's model (``predictor.families.base.FamilyModel``), whose hooks each have one signature.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from predictor.batching import AdapterLimit
from predictor.compiled import (
    CompiledBlocks,
    CompiledDecoder,
    CompiledDenoiser,
    compile_cache_counts,
    compile_phases,
)
from predictor.config import EngineConfig
from predictor.errors import GenerationFailed, PredictorError
from predictor.families.base import Conditioning, FamilyModel
from predictor.jobs import Job
from predictor.loading import LoadedPipeline
from predictor.lora import RowAdapters
from predictor.request import GenerationParams

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DenoiseWork:
    """One job's denoising state (its ``job.work``)."""

    scheduler: SchedulerMixin
    timesteps: torch.Tensor
    latents: torch.Tensor
    cond: Conditioning
    uncond: Conditioning | None  # None: no classifier-free guidance rows for this job
    step_kwargs: dict[str, Any]
    # img2img / inpainting state a family keeps per job (the image's latents, the noise, the mask)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(eq=False)
class PendingDecode:
    """Images decoded on the device whose pixels are on their way to the host."""

    jobs: list[Job]
    latents: torch.Tensor
    images: torch.Tensor  # decoded, in [-1, 1], on the device: for the safety checker and the float32 redo
    pixels: torch.Tensor  # uint8, (n, height, width, 3), on the host once ``copied`` has happened
    finite: torch.Tensor  # bool per image, on the host once ``copied`` has happened
    copied: torch.cuda.Event | None  # None: nothing asynchronous (CPU)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, part: slice) -> PendingDecode:
        return PendingDecode(
            self.jobs[part], self.latents[part], self.images[part], self.pixels[part], self.finite[part], self.copied
        )


@dataclass(eq=False)
class PendingPreview:
    """Preview pictures (uint8, n x H x W x 3) on their way to the host."""

    pixels: torch.Tensor  # on the host once ``copied`` has happened
    copied: torch.cuda.Event | None  # None: nothing asynchronous (CPU)

    def ready(self) -> bool:
        return self.copied is None or self.copied.query()


@dataclass(frozen=True)
class Decoded:
    image: Image.Image
    nsfw: bool


def _cuda_tensors(values: Iterable[Any], depth: int = 0) -> Iterator[torch.Tensor]:
    """The CUDA tensors in ``values``, looking into lists, tuples, dicts and scheduler objects (a few levels)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.is_cuda:
                yield value
        elif depth < 3 and isinstance(value, list | tuple):
            yield from _cuda_tensors(value, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            yield from _cuda_tensors(value.values(), depth + 1)
        elif depth < 3 and isinstance(value, SchedulerMixin):
            yield from _cuda_tensors(vars(value).values(), depth + 1)


def _one_by_one(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode image by image in half precision, as a lone pipeline call does: there a batched VAE call sums in
    another order and moved pixels by 2 to 6 grey levels (bfloat16, measured), and on a GPU the decode is a small,
    compute-bound part of an image's cost. float32 decodes in one call (within a grey level, and cheaper on CPUs)."""
    if latents.dtype == torch.float32:
        return vae.decode(latents, return_dict=False)[0]
    return torch.cat([vae.decode(latents[i : i + 1], return_dict=False)[0] for i in range(len(latents))])


def strength_schedule(scheduler: SchedulerMixin, steps: int, strength: float, kept: int) -> torch.Tensor:
    """The tail of a schedule an img2img or inpainting job runs, as diffusers' ``get_timesteps``: its last ``kept``
    steps (``request.kept_steps``), the scheduler's begin index set where they start."""
    start = (steps - kept) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """diffusers' postprocess to uint8 (denormalise in the model's dtype, then float32 *255, round half to even),
    done on the device so only bytes cross to the host."""
    unit = (images / 2 + 0.5).clamp(0, 1)
    return (unit.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def concat_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-row conditioning dicts as one batch: each key's tensors concatenated along the batch dimension, nested
    dicts (SDXL's ``added_cond_kwargs``) key by key, lists joined (Z-Image's captions, each at its own length)."""
    batch: dict[str, Any] = {}
    for key, first in rows[0].items():
        values = [row[key] for row in rows]
        if isinstance(first, dict):
            batch[key] = concat_rows(values)
        elif isinstance(first, list):
            batch[key] = [item for value in values for item in value]
        else:
            batch[key] = torch.cat(values)
    return batch


class DiffusionRunner:
    """Owns torch for the served model. Every method runs on the engine's worker thread."""

    def __init__(self, loaded: LoadedPipeline, config: EngineConfig) -> None:
        self.loaded = loaded
        self.model: FamilyModel = loaded.model
        self.pipe = loaded.pipe
        self.config = config
        self.device = loaded.device
        # The device runs queued work while the host goes on (CUDA); on the CPU every call finishes before
        # it returns. Tests set it to check the CUDA ordering on a CPU.
        self.device_runs_ahead = loaded.device.type == "cuda"
        self._prepare_stream: torch.cuda.Stream | None = None  # made on first use, on CUDA only
        self._step_kwarg_names: dict[type, frozenset[str]] = {}
        self._compiled: Any = None  # a CompiledDenoiser once warmed up with --compile
        self._decoder: Any = None  # a CompiledDecoder once warmed up with --compile
        self._vae_float32: Any = None  # made on the first float16 overflow
        self._preview_map: tuple[torch.Tensor, torch.Tensor] | None = None  # fitted on the first preview
        self.adapters: RowAdapters | None = None  # per-request LoRA adapters (--lora_dir)
        if loaded.loras is not None:
            self.adapters = RowAdapters(
                loaded.pipe,
                loaded.denoiser,
                loaded.loras,
                max_loaded=config.max_loaded_loras,
                slots=config.compile,  # --compile: the denoiser's adapters in fixed slots
                grouped=config.lora_batching == "grouped",
            )

    @property
    def has_safety_checker(self) -> bool:
        return self.model.has_safety_checker

    # ---- around the worker ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def worker_context(self) -> Iterator[None]:
        """Around the worker thread's whole life: torch's thread count, no autograd."""
        if self.config.torch_threads > 0:
            torch.set_num_threads(self.config.torch_threads)
        with torch.inference_mode():
            yield

    def free_cached_memory(self) -> None:
        """After an out-of-memory error: give the allocator's cached blocks back before a retry."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def leaves_host_free(self, params: Iterable[GenerationParams]) -> bool:
        """Whether the device runs a step of jobs with these parameters while the host goes on (CUDA, and
        schedulers that never wait for the GPU inside their step), so host work done then costs the GPU nothing.
        Blending inpainting noises the picture every step with the scheduler's host sigmas: such a step waits."""
        listed = list(params)
        if self.model.blends_inpainting and any(p.mode == "inpaint" for p in listed):
            return False
        return self.device_runs_ahead and all(p.scheduler in self.model.host_free_schedulers for p in listed)

    @staticmethod
    def compiled_graphs() -> int:
        """Graphs torch.compile has built in this process: constant after warm-up means no recompiles."""
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    # ---- LoRA adapters ---------------------------------------------------------------------------------

    def adapter_limit(self) -> AdapterLimit | None:
        """How many distinct LoRA adapters the scheduler may admit at once (--compile's slots); None: any."""
        return None if self.adapters is None else self.adapters.admission_limit()

    def batch_key(self, params: GenerationParams) -> Hashable:
        """The engine's batch key: the family's, and with --lora_batching grouped the adapters and their scales."""
        key = self.model.shape_key(params)
        return key if self.adapters is None else self.adapters.batch_key(params, key)

    # ---- new jobs ------------------------------------------------------------------------------------

    def prepare(self, jobs: list[Job]) -> None:
        """Give new jobs their conditioning, scheduler, generator and latents; on CUDA on the preparation
        stream, so its blocking copies wait for that stream only, never for the steps queued on the main one."""
        if self.device.type != "cuda":
            self._prepare(jobs)
            return
        if self._prepare_stream is None:
            self._prepare_stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._prepare_stream):
            self._prepare(jobs)
        main.wait_stream(self._prepare_stream)
        # Made on the preparation stream, read on the main one: the allocator must not hand their memory to
        # the preparation stream again before the main stream is done with them.
        for job in jobs:
            work: DenoiseWork = job.work
            held = [work.cond, work.uncond, work.latents, work.timesteps, work.scheduler, work.inputs]
            for tensor in _cuda_tensors(held):
                tensor.record_stream(main)

    def _prepare(self, jobs: list[Job]) -> None:
        model = self.model
        if self.adapters is None:
            conditioning = model.encode_prompts(jobs)
        else:  # each job's adapters into the model (or its 400 raised), then prompts encoded with them
            self.adapters.prepare(jobs)
            conditioning = self.adapters.encode_grouped(jobs, model.encode_prompts)
        encoded = model.encode_images([job for job in jobs if job.params.image is not None])
        for job, (cond, uncond) in zip(jobs, conditioning, strict=True):
            p = job.params
            scheduler = model.make_scheduler(p.scheduler)
            model.set_timesteps(scheduler, p.num_inference_steps, p.height, p.width)
            # Same draws as diffusers' pipeline with generator=torch.Generator("cpu").manual_seed(seed).
            generator = torch.Generator("cpu").manual_seed(p.seed)
            inputs: dict[str, torch.Tensor] = {}
            kept = model.kept_steps(p)
            if p.image is None:
                model.set_first_step(scheduler)
                timesteps = scheduler.timesteps
                latents = model.initial_latents(job, scheduler, generator)
            else:
                timesteps = strength_schedule(scheduler, p.num_inference_steps, p.strength, kept)
                latents, inputs = model.image_latents(job, scheduler, timesteps, generator, encoded[job])
            accepted = self._accepted_step_kwargs(scheduler)
            step_kwargs: dict[str, Any] = {}
            if "generator" in accepted:
                step_kwargs["generator"] = generator
            if "eta" in accepted:
                step_kwargs["eta"] = 0.0
            job.work = DenoiseWork(scheduler, timesteps, latents, cond, uncond, step_kwargs, inputs)
            job.steps_total = len(timesteps)
            job.steps_asked = kept

    def _accepted_step_kwargs(self, scheduler: SchedulerMixin) -> frozenset[str]:
        cls = type(scheduler)
        if cls not in self._step_kwarg_names:
            self._step_kwarg_names[cls] = frozenset(inspect.signature(scheduler.step).parameters)
        return self._step_kwarg_names[cls]

    # ---- a step ----------------------------------------------------------------------------------------

    def predict_noise(self, jobs: list[Job]) -> dict[Job, torch.Tensor]:
        """One denoiser call for ``jobs``, each at its own timestep; the guided noise prediction per job.
        Changes no job state, so the engine may retry it in smaller parts after an out-of-memory error."""
        model = self.model
        inputs: list[torch.Tensor] = []
        timesteps: list[torch.Tensor] = []
        rows: list[Conditioning] = []
        adapters: list[tuple] = []  # each row's LoRA adapters
        if self.adapters is not None:
            jobs = self.adapters.side_by_side(jobs)
        for job in jobs:
            work: DenoiseWork = job.work
            t = work.timesteps[job.steps_done]
            x = model.model_input(work, t)
            t_row = model.timestep_row(t)
            copies = 2 if work.uncond is not None else 1
            if work.uncond is not None:
                inputs += [x, x]
                rows += [work.uncond, work.cond]
                timesteps += [t_row, t_row]
            else:
                inputs.append(x)
                rows.append(work.cond)
                timesteps.append(t_row)
            adapters += [job.params.loras] * copies  # diffusers applies them to the unconditional row too
        with contextlib.nullcontext() if self.adapters is None else self.adapters.rows(adapters):
            noise = self.denoise(torch.cat(inputs), torch.cat(timesteps), concat_rows(rows))
        predictions, row = {}, 0
        for job in jobs:
            if job.work.uncond is not None:
                uncond, text = noise[row : row + 1], noise[row + 1 : row + 2]
                predictions[job] = model.mix_guidance(uncond, text, job.params)
                row += 2
            else:
                predictions[job] = noise[row : row + 1]
                row += 1
        return predictions

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """One denoiser call over a batch of rows: compiled at the native size with --compile, else eager."""
        if self._compiled is not None and tuple(sample.shape[1:]) == self.model.native_row_shape():
            return self._compiled(sample, timesteps, **conditioning)
        return self.model.denoiser_module(sample, timesteps, **conditioning, return_dict=False)[0]

    def advance(self, job: Job, noise: torch.Tensor) -> None:
        """Step the job's own scheduler with its noise prediction; inpainting without mask channels then puts the
        picture, noised to the next step, back outside the mask."""
        work: DenoiseWork = job.work
        t = work.timesteps[job.steps_done]
        work.latents = work.scheduler.step(noise, t, work.latents, **work.step_kwargs, return_dict=False)[0]
        job.steps_done += 1
        if "image_latents" not in work.inputs:
            return
        # After a step the schedulers read their step index, not the timestep's value, so the device slice serves
        # (the pipelines pass torch.tensor([timesteps[i + 1]])) without a copy to the host.
        kept = work.inputs["image_latents"]
        step = job.steps_done - 1
        if step < len(work.timesteps) - 1:
            kept = self.model.renoise(work.scheduler, kept, work.inputs["noise"], work.timesteps[step + 1 : step + 2])
        mask = work.inputs["mask"]
        work.latents = (1 - mask) * kept + mask * work.latents

    # ---- the decode ----------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, jobs: list[Job] | None = None) -> torch.Tensor:
        """Latents to images in [-1, 1] in the VAE's dtype."""
        vae = self.model.vae
        scaled = self.model.latents_for_vae(latents, vae.dtype, jobs)
        if self._decoder is not None and self._at_native_latent_size(latents):
            return self._decoder(scaled)
        return _one_by_one(vae, scaled)

    def decode_float32(self, latents: torch.Tensor, jobs: list[Job] | None = None) -> torch.Tensor:
        """Decode again in float32 after a float16 overflow."""
        if self._vae_float32 is None:
            logger.warning("the float16 VAE overflowed; decoding such images in float32 from now on")
            self._vae_float32 = copy.deepcopy(self.model.vae).to(torch.float32)
        return _one_by_one(self._vae_float32, self.model.latents_for_vae(latents, torch.float32, jobs))

    def start_decode(self, jobs: list[Job]) -> PendingDecode:
        """Queue the decode of finished jobs and the copy of their pixels to the host; wait for neither."""
        latents = self.model.final_latents(jobs)
        images = self.decode(latents, jobs)
        finite = torch.isfinite(images).flatten(1).all(dim=1)
        pixels = to_pixels(images)
        copied = None
        if pixels.is_cuda:
            host_pixels = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host_finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
            host_pixels.copy_(pixels, non_blocking=True)
            host_finite.copy_(finite, non_blocking=True)
            pixels, finite = host_pixels, host_finite
            copied = torch.cuda.Event()
            copied.record()
        return PendingDecode(jobs, latents, images, pixels, finite, copied)

    def finish_decode(self, decode: PendingDecode) -> list[Decoded | PredictorError]:
        """Pictures for a decode whose pixels are (or will be, waited for here) on the host, in the order of its
        jobs; a failure for an image that came out NaN/Inf. Raises out-of-memory (the engine retries in halves)."""
        if decode.copied is not None:
            decode.copied.synchronize()
        images, pixels = decode.images, decode.pixels
        finite = decode.finite.tolist()
        # NaN latents or a VAE overflow (fp16) would come out as a silent black image: refuse it instead.
        if not all(finite) and images.dtype == torch.float16:
            bad = [index for index, ok in enumerate(finite) if not ok]
            images = images.clone()
            images[bad] = self.decode_float32(decode.latents[bad], [decode.jobs[i] for i in bad]).to(images.dtype)
            finite = torch.isfinite(images).flatten(1).all(dim=1).tolist()
            pixels = to_pixels(images).cpu()
        if not all(finite):
            images = torch.nan_to_num(images)  # those jobs fail below; keep the safety checker quiet
        nsfw = self.model.flag_unsafe(images, decode.latents.dtype) or [False] * len(decode)
        outcomes: list[Decoded | PredictorError] = []
        for image, ok, flagged in zip(pixels, finite, nsfw, strict=True):
            if not ok:
                outcomes.append(GenerationFailed("the model produced NaN/Inf values; no image was made"))
            elif flagged:  # replaced by black, as diffusers does
                outcomes.append(Decoded(Image.new("RGB", image.shape[1::-1]), True))
            else:
                # The copy detaches the picture from the pinned buffer, which is reused once the decode is dropped.
                outcomes.append(Decoded(Image.fromarray(image.numpy().copy()), False))
        return outcomes

    # ---- previews --------------------------------------------------------------------------------------

    def preview_pixels(self, jobs: list[Job]) -> torch.Tensor:
        """Each job's picture as it stands (uint8, n x H x W x 3, on the device): decoded by the tiny VAE when
        --preview_vae_dir names one (full size), else the latents through a linear map to RGB fitted to this
        model's own VAE (latent resolution), so a preview costs a matrix product, not a decode."""
        tiny = self.loaded.preview_vae
        if tiny is not None:
            # As diffusers decodes with a tiny VAE in the pipeline's place: its own scaling and shift (1 and 0 for
            # TAESD and its kin, whose decoders take the denoiser's latents as they are).
            latents = self.model.final_latents(jobs).to(tiny.dtype) / tiny.config.scaling_factor
            images = tiny.decode(latents + tiny.config.shift_factor, return_dict=False)[0]
            return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        if self._preview_map is None:
            self._preview_map = self._fit_preview_map()
        weights, bias = self._preview_map  # a fit that raised is retried at the next preview
        latents = self.model.final_latents(jobs).to(torch.float32)
        rgb = torch.einsum("bchw,cd->bhwd", latents, weights) + bias
        return (rgb.clamp(0, 1) * 255).round().to(torch.uint8)

    def _fit_preview_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Least squares from latents to the VAE's pictures averaged over each latent's pixels, on a few random
        latents (seeded): no extra weights, and the same for every family (FLUX's latents unpacked)."""
        vae, scale = self.model.vae, self.pipe.vae_scale_factor
        generator = torch.Generator("cpu").manual_seed(0)
        channels = vae.config.latent_channels
        latents = torch.randn((2, channels, 16, 16), generator=generator).to(self.device)
        images = vae.decode(self.model.latents_for_vae(latents, vae.dtype), return_dict=False)[0].float()
        targets = torch.nn.functional.avg_pool2d((images / 2 + 0.5).clamp(0, 1), scale)  # (2, 3, 16, 16)
        inputs = latents.float().permute(0, 2, 3, 1).reshape(-1, channels)
        inputs = torch.cat([inputs, torch.ones(len(inputs), 1, device=inputs.device)], dim=1)
        outputs = targets.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(inputs.cpu(), outputs.cpu()).solution.to(self.device)
        logger.info("fitted the latent-to-RGB preview map to the VAE")
        return solution[:channels], solution[channels]

    def start_preview(self, jobs: list[Job]) -> PendingPreview:
        """Queue the previews and their copy to the host behind the step; wait for neither."""
        pixels = self.preview_pixels(jobs)
        if not pixels.is_cuda:
            return PendingPreview(pixels, None)
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return PendingPreview(host, copied)

    def finish_preview(self, pending: PendingPreview) -> list[Any]:
        if pending.copied is not None:
            pending.copied.synchronize()
        return [picture.numpy().copy() for picture in pending.pixels]

    # ---- --compile ---------------------------------------------------------------------------------------

    def _at_native_latent_size(self, latents: torch.Tensor) -> bool:
        """Compiled graphs exist for the native resolution only; other sizes run eagerly rather than compile
        at request time (which would stall every request and, past dynamo's limit, fail)."""
        size = self.model.native_size // self.pipe.vae_scale_factor
        return tuple(latents.shape[-2:]) == (size, size)

    def warm_up(self) -> None:
        """Compile, record graphs: whatever must happen before the first request (on the worker thread)."""
        if self.config.compile:
            self._compile()

    def _compile(self) -> None:
        """torch.compile the denoiser and the VAE decoder, then run them so no request compiles or records a graph."""
        device, config, model = self.device, self.config, self.model
        started = time.perf_counter()
        # CUDA graphs replay fixed shapes; they exist on CUDA only.
        cuda_graphs = device.type == "cuda" and (
            config.compile_mode == "reduce-overhead" or config.compile_backend == "cudagraphs"
        )
        max_rows = 2 * config.max_batch_size  # two rows per image with classifier-free guidance
        # Dynamo guards on requires_grad, and PEFT turns it off when it adds layers: off from the start.
        model.denoiser.requires_grad_(False)
        variants: tuple[contextlib.AbstractContextManager[None], ...] = (contextlib.nullcontext(),)
        if self.adapters is not None:  # adapters in fixed slots, so loading one never changes a compiled module
            self.adapters.install_for_compile(max_rows)
            variants = self.adapters.graph_variants()  # with and without adapter rows: both before serving
        denoiser: CompiledDenoiser | CompiledBlocks
        if model.compile_by_region:
            denoiser = CompiledBlocks(model.denoiser, model.denoiser_module, config, max_rows=max_rows)
        else:
            denoiser = CompiledDenoiser(model.denoiser_module, config, max_rows=max_rows, cuda_graphs=cuda_graphs)
        decoder = CompiledDecoder(model.vae.decode, config)
        denoiser_compile_s = denoiser_sizes_s = 0.0
        for variant in variants:
            with variant:
                compile_s, sizes_s = denoiser.warm_up(model.example_inputs, self._synchronize)
            denoiser_compile_s, denoiser_sizes_s = denoiser_compile_s + compile_s, denoiser_sizes_s + sizes_s
        decoder_started = time.perf_counter()
        vae = model.vae
        size = model.native_size // self.pipe.vae_scale_factor
        decoder(torch.zeros((1, vae.config.latent_channels, size, size), device=device, dtype=vae.dtype))
        self._synchronize()
        finished = time.perf_counter()
        self._compiled, self._decoder = denoiser, decoder
        hits, misses = compile_cache_counts()
        logger.info(
            "compiled the %s (%s) and the VAE decoder in %.1f s (%s, mode %s; compile cache: %d hits, %d misses): "
            "denoiser %.1f s, %s %.1f s, VAE decoder %.1f s; %s",
            type(model.denoiser).__name__,
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
