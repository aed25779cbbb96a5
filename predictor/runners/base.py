"""The model runner: everything that touches torch, for one model family.

The engine's loop asks a runner for five things, always on the worker thread: ``prepare`` new jobs,
``predict_noise`` for a batch (one denoiser call over all its rows, each at its own timestep),
``advance`` each job's own scheduler, ``start_decode`` finished jobs and ``finish_decode`` them into pictures.
``ModelRunner`` does what every family shares: a scheduler and a seeded generator per job, classifier-free
guidance rows, per-row conditioning as a dict of tensors concatenated key by key, the asynchronous copy of
pixels to the host, the NaN check, and on CUDA the preparation stream. A family subclass says how to encode
prompts, make the first latents, call its denoiser (a UNet or a transformer; compiled or not) and decode.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from predictor.config import EngineConfig
from predictor.errors import GenerationFailed, PredictorError
from predictor.jobs import Job
from predictor.lora import LoraAdapters
from predictor.pipeline import LoadedPipeline, set_timesteps
from predictor.request import GenerationParams, kept_steps
from predictor.scheduler import AdapterLimit

logger = logging.getLogger(__name__)

Conditioning = dict[str, torch.Tensor]  # one row's inputs to the denoiser besides the latents and timestep

_DEVICE_ERRORS: tuple[type[BaseException], ...] = (
    (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()
)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def is_device_error(exc: BaseException) -> bool:
    """An error raised by the accelerator itself (out-of-memory reported as one included)."""
    return isinstance(exc, _DEVICE_ERRORS)


def is_device_failure(exc: BaseException) -> bool:
    """An unrecoverable accelerator error (an out-of-memory reported as one is recoverable)."""
    return is_device_error(exc) and not is_oom(exc)


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


def set_first_step_index(scheduler: Any) -> None:
    """Find where the schedule starts on the host, as the scheduler's first step would on the device (the
    same lookup on a host copy of the same timesteps), so that step needs no device-to-host round trip."""
    if not (hasattr(scheduler, "set_begin_index") and hasattr(scheduler, "index_for_timestep")):
        return  # schedulers that track no step index (DDIM, PNDM)
    timesteps = scheduler.timesteps.cpu()
    scheduler.set_begin_index(scheduler.index_for_timestep(timesteps[0], timesteps))


def strength_schedule(scheduler: SchedulerMixin, steps: int, strength: float, kept: int) -> torch.Tensor:
    """The tail of a schedule an img2img or inpainting job runs, as diffusers' ``get_timesteps``: its last ``kept``
    steps (``schemas.kept_steps``), the scheduler's begin index set where they start."""
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
    dicts (SDXL's ``added_cond_kwargs``) key by key."""
    batch: dict[str, Any] = {}
    for key, first in rows[0].items():
        values = [row[key] for row in rows]
        batch[key] = concat_rows(values) if isinstance(first, dict) else torch.cat(values)
    return batch


class ModelRunner(ABC):
    """Owns torch for one model family. Every method runs on the engine's worker thread."""

    # Schedulers whose step makes no host synchronisation (measured on an H200 with bench/gpu_check.py): on CUDA
    # the host is free while such a step runs, so work queued behind it costs the GPU nothing.
    host_free_schedulers: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, loaded: LoadedPipeline, config: EngineConfig) -> None:
        self.loaded = loaded
        self.pipe = loaded.pipe
        self.config = config
        self.device = loaded.device
        # The device runs queued work while the host goes on (CUDA); on the CPU every call finishes before
        # it returns. Tests set it to check the CUDA ordering on a CPU.
        self.device_runs_ahead = loaded.device.type == "cuda"
        self._prepare_stream: torch.cuda.Stream | None = None  # made on first use, on CUDA only
        self._step_kwarg_names: dict[type, frozenset[str]] = {}
        self.adapters: LoraAdapters | None = None  # per-request LoRA adapters (--lora_dir)
        if loaded.loras is not None:
            self.adapters = LoraAdapters(loaded.pipe, loaded.loras, config.max_loaded_loras)
        self._adapter_jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # jobs whose adapters must stay loaded

    # ---- what a family defines ----------------------------------------------------------------

    @abstractmethod
    def batch_key(self, params: GenerationParams) -> Hashable:
        """Jobs with equal keys can share one denoiser call (today: the same latent shape)."""

    @abstractmethod
    def encode(self, jobs: list[Job]) -> list[tuple[Conditioning, Conditioning | None]]:
        """Each job's (conditional, unconditional) rows, the second None when the job runs unguided. Encode all
        jobs' prompts in as few calls as possible, and set ``job.prompt_truncated``."""

    @abstractmethod
    def initial_latents(self, job: Job, scheduler: SchedulerMixin, generator: torch.Generator) -> torch.Tensor:
        """The job's starting noise: the same draw diffusers' pipeline makes with the same generator."""

    @abstractmethod
    def make_scheduler(self, name: str) -> SchedulerMixin:
        """A fresh scheduler for one job (schedulers keep per-run state), from the family's own registry."""

    @abstractmethod
    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """One denoiser call over a batch of rows."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, jobs: list[Job] | None = None) -> torch.Tensor:
        """Latents to images in [-1, 1] in the model's dtype."""

    def decode_float32(self, latents: torch.Tensor, jobs: list[Job] | None = None) -> torch.Tensor | None:
        """Decode again in float32 after a float16 overflow; None where the family has no such fallback."""
        return None

    def flag_unsafe(self, images: torch.Tensor, dtype: torch.dtype) -> list[bool] | None:
        """The safety checker's verdict per image; None when there is none."""
        return None

    @property
    def has_safety_checker(self) -> bool:
        return False

    def warm_up(self) -> None:  # noqa: B027 - most families need nothing here
        """Compile, record graphs: whatever must happen before the first request (on the worker thread)."""

    def timestep_row(self, t: torch.Tensor) -> torch.Tensor:
        """A job's timestep as its denoiser row takes it (the UNet embeds timesteps as float32)."""
        return t.to(torch.float32).reshape(1)

    def model_input(self, work: DenoiseWork, t: torch.Tensor) -> torch.Tensor:
        return work.scheduler.scale_model_input(work.latents, t)

    def encode_images(self, jobs: list[Job]) -> dict[Job, Any]:
        """img2img and inpainting jobs' encoded inputs, in as few VAE calls as possible (families that take images)."""
        if jobs:
            raise GenerationFailed(f"the {self.loaded.family.name} runner takes no input image")
        return {}

    def image_latents(
        self, job: Job, scheduler: SchedulerMixin, timesteps: torch.Tensor, generator: torch.Generator, encoded: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """An image job's starting latents and the per-job state its steps need (families that take images)."""
        raise GenerationFailed(f"the {self.loaded.family.name} runner takes no input image")

    def preview_pixels(self, jobs: list[Job]) -> torch.Tensor:
        """Each job's picture as it stands, uint8 (n, H, W, 3) on the device (families that preview)."""
        raise NotImplementedError(f"the {self.loaded.family.name} runner makes no previews")

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

    def set_first_step(self, scheduler: SchedulerMixin) -> None:
        """Where a job's schedule starts: found on the host as the scheduler itself would find it on the device."""
        set_first_step_index(scheduler)

    def guidance_scale(self, params: GenerationParams) -> float:
        """The scale that mixes a job's unconditional and conditional rows (FLUX: its true_cfg_scale)."""
        return params.guidance_scale

    def final_latents(self, jobs: list[Job]) -> torch.Tensor:
        """Finished jobs' latents as the VAE takes them (FLUX unpacks its 2x2 patches here)."""
        return torch.cat([job.work.latents for job in jobs])

    # ---- what the engine calls --------------------------------------------------------------------

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
        schedulers that never wait for the GPU inside their step), so host work done then costs the GPU nothing."""
        return self.device_runs_ahead and all(p.scheduler in self.host_free_schedulers for p in params)

    @staticmethod
    def compiled_graphs() -> int:
        """Graphs torch.compile has built in this process: constant after warm-up means no recompiles."""
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

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

    def adapter_limit(self) -> AdapterLimit | None:
        """With --compile, adapters live in --max_loaded_loras fixed slots: the scheduler admits no more distinct
        adapters at once (the others wait their turn in the queue)."""
        if self.adapters is None or not self.config.compile:
            return None
        return AdapterLimit(lambda job: frozenset(name for name, _ in job.params.loras), self.config.max_loaded_loras)

    def job_key(self, params: GenerationParams) -> Hashable:
        """The engine's batch key: the family's, and with --lora_batching grouped the adapters and their scales."""
        key = self.batch_key(params)
        if self.adapters is not None and self.config.lora_batching == "grouped":
            return (key, params.loras)
        return key

    def _load_adapters(self, jobs: list[Job]) -> None:
        """Put the adapters new jobs name into the model (evicting unused ones past --max_loaded_loras); a job
        whose adapter does not fit the model raises its 400 (the engine then prepares the others one by one)."""
        if self.adapters is None:
            return
        # Unfinished jobs, decoding ones included: on CUDA a decoding job's last step may still be reading its slot.
        live = [job.params.loras for job in self._adapter_jobs if not job.finished]
        failed = self.adapters.ensure([job.params.loras for job in jobs], in_use=live)
        for job in jobs:
            for name, _ in job.params.loras:
                if name in failed:
                    raise failed[name]
        self._adapter_jobs.update(job for job in jobs if job.params.loras)

    def _encode_with_adapters(self, jobs: list[Job]) -> list[tuple[Conditioning, Conditioning | None]]:
        """``encode`` with each job's adapters in its text encoders: one encoding call per adapter set."""
        if self.adapters is None or not any(job.params.loras for job in jobs):
            return self.encode(jobs)
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.params.loras, []).append(job)
        conditioning: dict[Job, tuple[Conditioning, Conditioning | None]] = {}
        for loras, group in groups.items():
            with self.adapters.rows([loras], denoiser=False):
                conditioning.update(zip(group, self.encode(group), strict=True))
        return [conditioning[job] for job in jobs]

    def _prepare(self, jobs: list[Job]) -> None:
        self._load_adapters(jobs)
        conditioning = self._encode_with_adapters(jobs)
        encoded = self.encode_images([job for job in jobs if job.params.image is not None])
        for job, (cond, uncond) in zip(jobs, conditioning, strict=True):
            p = job.params
            scheduler = self.make_scheduler(p.scheduler)
            set_timesteps(self.loaded, scheduler, p.num_inference_steps, p.height, p.width, self.device)
            # Same draws as diffusers' pipeline with generator=torch.Generator("cpu").manual_seed(seed).
            generator = torch.Generator("cpu").manual_seed(p.seed)
            inputs: dict[str, torch.Tensor] = {}
            if p.image is None:
                self.set_first_step(scheduler)
                timesteps = scheduler.timesteps
                latents = self.initial_latents(job, scheduler, generator)
            else:
                kept = kept_steps(p.num_inference_steps, p.strength, self.loaded.family.flow_matching)
                timesteps = strength_schedule(scheduler, p.num_inference_steps, p.strength, kept)
                latents, inputs = self.image_latents(job, scheduler, timesteps, generator, encoded[job])
            accepted = self._accepted_step_kwargs(scheduler)
            step_kwargs: dict[str, Any] = {}
            if "generator" in accepted:
                step_kwargs["generator"] = generator
            if "eta" in accepted:
                step_kwargs["eta"] = 0.0
            job.work = DenoiseWork(scheduler, timesteps, latents, cond, uncond, step_kwargs, inputs)
            job.steps_total = len(timesteps)
            job.steps_asked = kept_steps(p.num_inference_steps, p.strength, self.loaded.family.flow_matching)

    def _accepted_step_kwargs(self, scheduler: SchedulerMixin) -> frozenset[str]:
        cls = type(scheduler)
        if cls not in self._step_kwarg_names:
            self._step_kwarg_names[cls] = frozenset(inspect.signature(scheduler.step).parameters)
        return self._step_kwarg_names[cls]

    def predict_noise(self, jobs: list[Job]) -> dict[Job, torch.Tensor]:
        """One denoiser call for ``jobs``, each at its own timestep; the guided noise prediction per job.
        Changes no job state, so the engine may retry it in smaller parts after an out-of-memory error."""
        inputs: list[torch.Tensor] = []
        timesteps: list[torch.Tensor] = []
        rows: list[Conditioning] = []
        adapters: list[tuple] = []  # each row's LoRA adapters
        if self.adapters is not None:  # rows with the same adapters side by side: one slice each in every LoRA layer
            jobs = sorted(jobs, key=lambda job: job.params.loras)
        for job in jobs:
            work: DenoiseWork = job.work
            t = work.timesteps[job.steps_done]
            x = self.model_input(work, t)
            t_row = self.timestep_row(t)
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
        with contextlib.ExitStack() as stack:
            if self.adapters is not None:
                stack.enter_context(self.adapters.rows(adapters))
            noise = self.denoise(torch.cat(inputs), torch.cat(timesteps), concat_rows(rows))
        predictions, row = {}, 0
        for job in jobs:
            if job.work.uncond is not None:
                uncond, text = noise[row : row + 1], noise[row + 1 : row + 2]
                predictions[job] = uncond + self.guidance_scale(job.params) * (text - uncond)
                row += 2
            else:
                predictions[job] = noise[row : row + 1]
                row += 1
        return predictions

    def advance(self, job: Job, noise: torch.Tensor) -> None:
        """Step the job's own scheduler with its noise prediction."""
        work: DenoiseWork = job.work
        t = work.timesteps[job.steps_done]
        work.latents = work.scheduler.step(noise, t, work.latents, **work.step_kwargs, return_dict=False)[0]
        job.steps_done += 1

    def start_decode(self, jobs: list[Job]) -> PendingDecode:
        """Queue the decode of finished jobs and the copy of their pixels to the host; wait for neither."""
        latents = self.final_latents(jobs)
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
            redone = self._redecode_in_float32(decode.latents, images, finite, decode.jobs)
            if redone is not None:
                images, finite = redone
                pixels = to_pixels(images).cpu()
        if not all(finite):
            images = torch.nan_to_num(images)  # those jobs fail below; keep the safety checker quiet
        nsfw = self.flag_unsafe(images, decode.latents.dtype) or [False] * len(decode)
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

    def _redecode_in_float32(
        self, latents: torch.Tensor, images: torch.Tensor, finite: list[bool], jobs: list[Job]
    ) -> tuple[torch.Tensor, list[bool]] | None:
        """fp16 VAEs can overflow on some latents; decode those again in float32."""
        bad = [index for index, ok in enumerate(finite) if not ok]
        redone = self.decode_float32(latents[bad], [jobs[index] for index in bad])
        if redone is None:
            return None
        images = images.clone()
        images[bad] = redone.to(images.dtype)
        return images, torch.isfinite(images).flatten(1).all(dim=1).tolist()
