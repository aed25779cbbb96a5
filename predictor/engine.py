"""The generation engine: one worker thread owns torch and runs step-level (continuous) batching.

Every image is a *job* with its own scheduler instance, seeded generator, latents, text embeddings,
guidance scale and step count. The worker runs one loop:

1. admit waiting jobs (FIFO per resolution group, while the group has fewer than ``max_batch_size``
   images in flight);
2. pick the next resolution group round-robin and run ONE UNet call over all its prepared jobs, each at its
   own timestep (both classifier-free-guidance halves when a job uses guidance);
3. advance each job's scheduler on its own slice of the UNet output;
4. launch the VAE decode of the jobs that finished on this step; their pixels come back to the host while
   the GPU runs the next step, and they are answered after it is launched (the GPU never waits for the host
   to turn images into pictures);
5. prepare the newly admitted jobs (one text-encoder call for all of them, a scheduler, seeded latents) while
   the GPU runs the step just launched, where that step leaves the host free (CUDA, and schedulers whose step
   does not synchronise: ``ASYNC_STEP_SCHEDULERS``); they join the next step. Otherwise, and on an idle engine,
   new jobs are prepared first and join this step.

On CUDA, preparation runs on its own stream: the copies it makes from host memory wait for that stream only,
never for the UNet steps queued on the main one, and the first scheduler step finds its place in the
schedule on the host. So the host stays ahead of the GPU and admissions do not drain its queue.

A job joins at the next step boundary (nobody waits for a batch to fill) and leaves as soon as it is done.
Fairness: within a group, jobs are admitted in arrival order, so a job waits at most for the jobs ahead of it
in its own group; groups take turns step by step, so no group can starve another.

Jobs whose future is cancelled (client gone) or whose deadline passed stop at the next step boundary.
Out-of-memory inside a batch frees the cache and retries the step in halves; a job that does not fit alone
fails with ``OutOfMemory`` and the engine keeps serving.
"""

from __future__ import annotations

import collections
import copy
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from predictor import metrics
from predictor.errors import (
    DeadlineExceeded,
    DeviceFailed,
    GenerationFailed,
    OutOfMemory,
    Overloaded,
    PredictorError,
    ShuttingDown,
)
from predictor.pipeline import LoadedPipeline, make_scheduler
from predictor.schemas import GenerationParams

logger = logging.getLogger(__name__)

# One step (or decode) running longer than this means the device hangs: liveness fails, the pod restarts.
STALL_S = 120.0
# Called on the worker thread as (event, current, total): ("queued", position, 0) and ("step", i, n).
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class GenerationResult:
    image: Image.Image
    params: GenerationParams
    prompt_truncated: bool
    nsfw: bool
    seconds: float


@dataclass(eq=False)
class _Job:
    params: GenerationParams
    future: Future[GenerationResult]
    submitted_at: float
    deadline: float | None
    on_progress: ProgressCallback | None
    # Set on admission.
    scheduler: Any = None
    timesteps: torch.Tensor | None = None
    step: int = 0
    latents: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_truncated: bool = False

    @property
    def group(self) -> tuple[int, int]:
        return (self.params.height, self.params.width)

    @property
    def prepared(self) -> bool:
        return self.timesteps is not None

    @property
    def done(self) -> bool:
        return self.timesteps is not None and self.step >= len(self.timesteps)

    def abandoned(self) -> bool:
        return self.future.cancelled()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass(eq=False)
class _PendingDecode:
    """Images decoded on the device whose pixels are on their way to the host."""

    jobs: list[_Job]
    latents: torch.Tensor
    images: torch.Tensor  # decoded, in [-1, 1], on the device: for the safety checker and the float32 redo
    pixels: torch.Tensor  # uint8, (n, height, width, 3), on the host once ``copied`` has happened
    finite: torch.Tensor  # bool per image, on the host once ``copied`` has happened
    copied: torch.cuda.Event | None  # None: nothing asynchronous (CPU)


# torch.compile's own timers worth an operator's eye (nested: tracing and the backend are parts of the total).
_COMPILE_PHASES = {
    "_compile.compile_inner": "dynamo in all",
    "bytecode_tracing": "tracing",
    "OutputGraph.call_user_compiler": "backend",
    "create_aot_dispatcher_function": "AOT autograd",
    "compile_fx_inner": "inductor",
    "PyCodeCache.load_by_key_path": "loading compiled code",
    "async_compile.wait": "kernel compiles",
}


def _compile_phases() -> str:
    """Where torch.compile spent its time, from its own timers (an empty string where they are missing)."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
    except Exception:  # private API: its shape may change between torch releases
        return ""
    seconds = dict(zip(names, values, strict=False))
    parts = [f"{label} {float(seconds[name]):.1f} s" for name, label in _COMPILE_PHASES.items() if name in seconds]
    return "torch.compile timers: " + ", ".join(parts) if parts else ""


# Schedulers whose step makes no host synchronisation (measured with bench/gpu_check.py on an H200). The others
# wait for the GPU inside diffusers' step code (euler_a draws its noise on the host; ddim, pndm and unipc read
# device values), so overlapping host work with their steps gains nothing.
ASYNC_STEP_SCHEDULERS = frozenset({"dpmpp_2m", "dpmpp_2m_karras", "euler", "lms"})


def _cuda_tensors(values: Iterable[Any], depth: int = 0) -> Iterable[torch.Tensor]:
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


def _set_first_step_index(scheduler: Any) -> None:
    """Find where the schedule starts on the host, as the scheduler's first step would on the device (the
    same lookup on a host copy of the same timesteps), so that step needs no device-to-host round trip."""
    if not (hasattr(scheduler, "set_begin_index") and hasattr(scheduler, "index_for_timestep")):
        return  # schedulers that track no step index (DDIM, PNDM)
    timesteps = scheduler.timesteps.cpu()
    scheduler.set_begin_index(scheduler.index_for_timestep(timesteps[0], timesteps))


def _to_pixels(images: torch.Tensor) -> torch.Tensor:
    """diffusers' postprocess to uint8 (denormalise in the model's dtype, then float32 *255, round half to even),
    done on the device so only bytes cross to the host."""
    unit = (images / 2 + 0.5).clamp(0, 1)
    return (unit.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


@dataclass(frozen=True)
class EngineConfig:
    model_name: str = "model"
    max_batch_size: int = 8
    max_queue: int = 32
    request_timeout_s: float | None = 300.0
    torch_threads: int = 0  # 0: torch's default
    compile: bool = False
    compile_mode: str = "reduce-overhead"
    compile_backend: str = "inductor"


def batch_buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two up to ``max_rows``: with CUDA graphs, graphs are recorded for these row counts only, and
    the engine pads a UNet call's rows up to the next bucket instead of recording one for every size."""
    buckets, size = [], 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    buckets.append(max_rows if max_rows > 0 else 1)
    return tuple(dict.fromkeys(buckets))


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


_DEVICE_ERRORS: tuple[type[BaseException], ...] = (
    (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()
)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def _is_device_failure(exc: BaseException) -> bool:
    """An unrecoverable accelerator error (an out-of-memory reported as one is recoverable)."""
    return isinstance(exc, _DEVICE_ERRORS) and not _is_oom(exc)


class GenerationEngine:
    def __init__(self, loaded: LoadedPipeline, config: EngineConfig):
        self.loaded = loaded
        self.pipe = loaded.pipe
        self.config = config
        self._labels = {"model_name": config.model_name}
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._active: list[_Job] = []
        self._finishing: list[_PendingDecode] = []
        self._group_turns: collections.deque[tuple[int, int]] = collections.deque()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._step_kwargs_names: dict[type, set[str]] = {}
        self.healthy = True
        self._unet: Callable[..., Any] = self.pipe.unet
        self._vae_decode_fn: Callable[..., Any] = self.pipe.vae.decode
        # CUDA graphs (reduce-overhead) replay fixed shapes: UNet calls are padded up to a bucket of rows, each
        # bucket recorded at start. Without them the compiled UNet takes any row count (a dynamic batch
        # dimension), so nothing is padded. Guided images take two rows; a lone unguided image is padded to two.
        self._cuda_graphs = config.compile and (
            config.compile_mode == "reduce-overhead" or config.compile_backend == "cudagraphs"
        )
        self._row_buckets = (
            tuple(b for b in batch_buckets(2 * config.max_batch_size) if b > 1) if self._cuda_graphs else ()
        )
        self._vae_float32: Any = None  # made on the first fp16 overflow
        self._prepare_stream: torch.cuda.Stream | None = None  # made on first use, on CUDA only
        self._device_runs_ahead = loaded.device.type == "cuda"  # runs queued work while the host goes on
        self._ready = threading.Event()
        self._busy_since: float | None = None  # when the worker started its current step (liveness)
        self._startup_error: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker; with ``compile``, wait until every bucket's graph is compiled and warm."""
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    @staticmethod
    def compiled_graphs() -> int:
        """Graphs torch.compile has built in this process: constant after warm-up means no recompiles."""
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def _compile(self) -> None:
        """torch.compile the UNet (batch dimension dynamic: one graph for every batch size) and the VAE decoder
        (one image at a time: one graph), then run them so no request compiles or records a CUDA graph."""
        pipe, device, config = self.pipe, self.loaded.device, self.config

        def options(mode: str, dynamic: bool | None) -> dict[str, Any]:
            chosen: dict[str, Any] = {"backend": config.compile_backend, "fullgraph": True, "dynamic": dynamic}
            if config.compile_backend == "inductor":
                chosen["mode"] = mode
            return chosen

        started = time.perf_counter()
        self._unet = torch.compile(pipe.unet, **options(config.compile_mode, None))
        # The decoder runs once per image, not per step: CUDA graphs would buy little and cost memory.
        vae_mode = "default" if config.compile_mode == "reduce-overhead" else config.compile_mode
        self._vae_decode_fn = torch.compile(pipe.vae.decode, **options(vae_mode, False))
        size = self.loaded.native_size // pipe.vae_scale_factor
        channels = pipe.unet.config.in_channels
        context = pipe.text_encoder.config.hidden_size
        dtype = self.loaded.dtype

        def unet_inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            sample = torch.zeros((rows, channels, size, size), device=device, dtype=dtype)
            timesteps = torch.full((rows,), 500.0, device=device)
            hidden = torch.zeros((rows, pipe.tokenizer.model_max_length, context), device=device, dtype=dtype)
            return sample, timesteps, hidden

        first = unet_inputs(2)
        for tensor in first:
            # One graph for all row counts where the kernels allow; "maybe": a backend that needs a fixed batch
            # size compiles per size (all at start, below) instead of failing.
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        self._call_unet(*first)
        unet_compiled = time.perf_counter()
        # Run every row count a request can bring, so a size the first graph's guards exclude (some convolution
        # backends depend on the batch size) compiles now, not under a request. CUDA graph trees need three
        # runs per bucket: warm up, record, replay.
        if self._cuda_graphs:
            row_counts, repeats = self._row_buckets, 3
        else:
            row_counts, repeats = tuple(range(2, 2 * config.max_batch_size + 1)), 1
        for rows in row_counts:
            for _ in range(repeats):
                self._call_unet(*unet_inputs(rows))
        if device.type == "cuda":
            torch.cuda.synchronize()
        sizes_warmed = time.perf_counter()
        self._call_decode(torch.zeros((1, pipe.vae.config.latent_channels, size, size), device=device, dtype=dtype))
        if device.type == "cuda":
            torch.cuda.synchronize()
        finished = time.perf_counter()
        from torch._dynamo.utils import counters

        # Whether --compile_cache_dir did its job: a restart on a warm cache has hits and no misses.
        cache = counters["inductor"]
        logger.info(
            "compiled the UNet (%s) and the VAE decoder in %.1f s (%s, mode %s; compile cache: %d hits, %d misses): "
            "UNet %.1f s, %s %.1f s, VAE decoder %.1f s; %s",
            f"CUDA graphs for {len(self._row_buckets)} batch sizes" if self._cuda_graphs else "dynamic batch size",
            finished - started,
            config.compile_backend,
            config.compile_mode,
            cache["fxgraph_cache_hit"],
            cache["fxgraph_cache_miss"],
            unet_compiled - started,
            "recording CUDA graphs" if self._cuda_graphs else "running every batch size",
            sizes_warmed - unet_compiled,
            finished - sizes_warmed,
            _compile_phases(),
        )

    def _compiled_for(self, latents: torch.Tensor) -> bool:
        """Compiled graphs exist for the native resolution only; other sizes run eagerly rather than compile
        at request time (which would stall every request and, past dynamo's limit, fail)."""
        size = self.loaded.native_size // self.pipe.vae_scale_factor
        return self.config.compile and tuple(latents.shape[-2:]) == (size, size)

    def _call_unet(self, sample: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if not self._compiled_for(sample):
            return self.pipe.unet(sample, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        rows = sample.shape[0]
        # One row would specialise the dynamic batch dimension (a recompile): pad it to two.
        bucket = next((b for b in self._row_buckets if b >= rows), max(rows, 2))
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        noise = self._unet(
            _pad_rows(sample, bucket),
            _pad_rows(timesteps, bucket),
            encoder_hidden_states=_pad_rows(hidden, bucket),
            return_dict=False,
        )[0][:rows]
        # A CUDA graph's output lives in memory the next replay overwrites: keep a copy.
        return noise.clone() if self._cuda_graphs else noise

    def _call_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not self._compiled_for(latents):
            return self.pipe.vae.decode(latents, return_dict=False)[0]
        # The compiled decoder has one graph, for one image; a batch goes through it image by image.
        return torch.cat([self._vae_decode_fn(latents[i : i + 1], return_dict=False)[0] for i in range(len(latents))])

    def close(self, timeout: float | None = None) -> bool:
        """Stop admitting; let admitted work finish (up to ``timeout``); stop the worker. True if drained."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        drained = self.wait_idle(timeout)
        with self._cond:
            self._stop = True
            for job in list(self._waiting) + self._active + [j for d in self._finishing for j in d.jobs]:
                self._fail(job, ShuttingDown("the server is shutting down"))
            self._waiting.clear()
            self._active.clear()
            self._finishing.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        return drained

    def stop_admitting(self) -> None:
        with self._cond:
            self._accepting = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._waiting or self._active or self._finishing:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
        return True

    def alive(self, stall_s: float = STALL_S) -> bool:
        """False when the worker is dead, the device failed, or one step has run for ``stall_s`` (a hung GPU)."""
        if not self.healthy or self._thread is None or not self._thread.is_alive():
            return False
        busy_since = self._busy_since
        return busy_since is None or time.monotonic() - busy_since < stall_s

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_images(self) -> int:
        return len(self._active)

    # ---- submission (any thread) ---------------------------------------------------------------

    def submit(
        self,
        params: Iterable[GenerationParams],
        on_progress: ProgressCallback | None = None,
        timeout_s: float | None = None,
    ) -> list[Future[GenerationResult]]:
        """Queue the images of one request together: all are admitted, or none (503 overloaded)."""
        params = list(params)
        now = time.monotonic()
        timeout_s = self.config.request_timeout_s if timeout_s is None else timeout_s
        deadline = now + timeout_s if timeout_s else None
        jobs = [_Job(p, Future(), now, deadline, on_progress) for p in params]
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if not self.healthy:
                raise DeviceFailed("the GPU is in a failed state; the server is restarting")
            if len(self._waiting) + len(jobs) > self.config.max_queue:
                raise Overloaded(
                    f"too many queued images ({len(self._waiting)} waiting, limit {self.config.max_queue}); "
                    "retry later",
                    headers={"Retry-After": "1"},
                )
            position = len(self._waiting)
            self._waiting.extend(jobs)
            metrics.QUEUE_DEPTH.labels(**self._labels).set(len(self._waiting))
            self._cond.notify_all()
        if on_progress is not None:
            on_progress("queued", position, 0)
        return [job.future for job in jobs]

    def generate(self, params: GenerationParams, timeout: float | None = None) -> GenerationResult:
        """Blocking helper (warm-up, benchmarks, tests): one image."""
        return self.submit([params])[0].result(timeout=timeout)

    # ---- worker ---------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.config.torch_threads > 0:
            torch.set_num_threads(self.config.torch_threads)
        with torch.inference_mode():
            try:
                if self.config.compile:
                    self._compile()  # on this thread: CUDA graphs belong to the thread that records them
            except BaseException as exc:
                self._startup_error = exc
                return
            finally:
                self._ready.set()
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and not self._active and not self._finishing:
                        self._cond.wait()
                    if self._stop:
                        return
                    admitted = self._admit_locked()
                self._busy_since = time.monotonic()
                try:
                    earlier = len(self._finishing)  # decodes launched before this step
                    # On CUDA, with jobs already running, their step goes first and the new jobs are prepared
                    # while the GPU runs it; an idle engine prepares first, so a lone request never waits a
                    # step. Where the step itself waits for the GPU (CPU; schedulers that synchronise) there is
                    # nothing to overlap: new jobs are prepared and join at once.
                    running = [job for job in self._active if job.prepared]
                    if admitted and not (running and self._overlaps(running)):
                        self._run_with_oom_split(admitted, self._prepare_or_fail)
                        admitted = []
                    self._expire_overdue()
                    group = self._next_group()
                    if group is not None:
                        members = [job for job in self._active if job.group == group and job.prepared]
                        self._step(members)
                        finished = [job for job in members if job.done and not job.future.done()]
                        if finished:
                            self._run_with_oom_split(finished, self._launch_decode)
                    admitted = [job for job in admitted if not job.future.done()]  # cancelled or expired meanwhile
                    if admitted:
                        self._run_with_oom_split(admitted, self._prepare_or_fail)
                    # Answer the decodes launched before this step while the GPU runs it. Answer at once when
                    # nothing else runs, unless waiting jobs will start a step that hides the answering; when
                    # nothing was asynchronous (CPU); or when a safety checker would wait anyway.
                    if self._active:
                        answer_all = self.pipe.safety_checker is not None
                    else:
                        with self._cond:
                            answer_all = not (self._waiting and self._overlaps(self._waiting))
                    self._finish(
                        [d for i, d in enumerate(self._finishing) if i < earlier or answer_all or d.copied is None]
                    )
                except Exception as exc:  # a device fault or a bug: fail what was in flight, keep serving
                    logger.exception("generation step failed")
                    self._fail_all_active(exc)
                except BaseException as exc:
                    self.healthy = False  # the worker is gone: liveness must fail so the pod restarts
                    self._fail_all_active(exc)
                    raise
                finally:
                    self._busy_since = None
                    self._retire()

    def _admit_locked(self) -> list[_Job]:
        in_flight = collections.Counter(job.group for job in self._active)
        admitted: list[_Job] = []
        kept: collections.deque[_Job] = collections.deque()
        now = time.monotonic()
        for job in self._waiting:
            if job.abandoned():
                continue
            if job.expired(now):
                self._fail(job, DeadlineExceeded(f"the request waited longer than {self._timeout_text()}"))
                continue
            if in_flight[job.group] < self.config.max_batch_size:
                in_flight[job.group] += 1
                admitted.append(job)
                if job.group not in self._group_turns:
                    self._group_turns.append(job.group)
            else:
                kept.append(job)
        self._waiting = kept
        self._active.extend(admitted)
        metrics.QUEUE_DEPTH.labels(**self._labels).set(len(kept))
        metrics.ACTIVE_IMAGES.labels(**self._labels).set(len(self._active))
        return admitted

    def _prepare_or_fail(self, jobs: list[_Job]) -> None:
        """Prepare new jobs together; if that fails for another reason than memory, retry one by one so only
        the job at fault fails."""
        try:
            self._prepare(jobs)
        except Exception as exc:
            if _is_oom(exc) or isinstance(exc, _DEVICE_ERRORS):
                raise
            for job in jobs:
                try:
                    self._prepare([job])
                except Exception as single:
                    if _is_oom(single) or isinstance(single, _DEVICE_ERRORS):
                        raise
                    logger.exception("could not start a generation")
                    self._fail(job, GenerationFailed("the generation could not start"))

    def _prepare(self, jobs: list[_Job]) -> None:
        """Prepare new jobs; on CUDA on the preparation stream, which the main stream then waits for."""
        if self.loaded.device.type != "cuda":
            self._prepare_jobs(jobs)
            return
        if self._prepare_stream is None:
            self._prepare_stream = torch.cuda.Stream(self.loaded.device)
        main = torch.cuda.current_stream(self.loaded.device)
        with torch.cuda.stream(self._prepare_stream):
            self._prepare_jobs(jobs)
        main.wait_stream(self._prepare_stream)
        # Made on the preparation stream, read on the main one: the allocator must not hand their memory to
        # the preparation stream again before the main stream is done with them.
        for job in jobs:
            for tensor in _cuda_tensors([job.cond, job.uncond, job.latents, job.timesteps, job.scheduler]):
                tensor.record_stream(main)

    def _overlaps(self, jobs: Iterable[_Job]) -> bool:
        """Whether a step of ``jobs`` leaves the host free while the GPU runs it (so preparing or answering
        other work then costs the GPU nothing)."""
        return self._device_runs_ahead and all(job.params.scheduler in ASYNC_STEP_SCHEDULERS for job in jobs)

    def _prepare_jobs(self, jobs: list[_Job]) -> None:
        """Encode the text of all new jobs in one call; give each its scheduler, generator and latents."""
        pipe, device = self.pipe, self.loaded.device
        guided = [job for job in jobs if job.params.uses_guidance]
        texts = [job.params.prompt for job in jobs] + [job.params.negative_prompt for job in guided]
        embeds, _ = pipe.encode_prompt(texts, device, 1, False)
        for index, job in enumerate(jobs):
            job.cond = embeds[index : index + 1]
        for index, job in enumerate(guided, start=len(jobs)):
            job.uncond = embeds[index : index + 1]
        latent_channels = pipe.unet.config.in_channels
        scale = pipe.vae_scale_factor
        max_tokens = pipe.tokenizer.model_max_length
        for job in jobs:
            p = job.params
            job.prompt_truncated = (
                len(pipe.tokenizer(p.prompt, truncation=True, max_length=max_tokens + 1).input_ids) > max_tokens
            )
            job.scheduler = make_scheduler(p.scheduler, pipe.scheduler.config)
            job.scheduler.set_timesteps(p.num_inference_steps, device=device)
            job.timesteps = job.scheduler.timesteps
            _set_first_step_index(job.scheduler)
            # Same draw as diffusers' pipeline with generator=torch.Generator("cpu").manual_seed(seed).
            generator = torch.Generator("cpu").manual_seed(p.seed)
            shape = (1, latent_channels, p.height // scale, p.width // scale)
            job.latents = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
            job.latents = job.latents * job.scheduler.init_noise_sigma
            accepted = self._step_kwarg_names(job.scheduler)
            if "generator" in accepted:
                job.step_kwargs["generator"] = generator
            if "eta" in accepted:
                job.step_kwargs["eta"] = 0.0

    def _step_kwarg_names(self, scheduler: Any) -> set[str]:
        cls = type(scheduler)
        if cls not in self._step_kwargs_names:
            self._step_kwargs_names[cls] = set(inspect.signature(scheduler.step).parameters)
        return self._step_kwargs_names[cls]

    def _next_group(self) -> tuple[int, int] | None:
        live = {job.group for job in self._active if job.prepared}
        for _ in range(len(self._group_turns)):
            group = self._group_turns[0]
            self._group_turns.rotate(-1)
            if group in live:
                return group
        return None

    def _expire_overdue(self) -> None:
        now = time.monotonic()
        for job in self._active:
            if not job.future.done() and job.expired(now):
                self._fail(job, DeadlineExceeded(f"the request did not finish within {self._timeout_text()}"))

    def _timeout_text(self) -> str:
        return f"{self.config.request_timeout_s:g} s (--request_timeout_s)"

    def _step(self, members: list[_Job]) -> None:
        members = [job for job in members if not job.future.done()]
        if not members:
            return
        started = time.perf_counter()
        # Only the UNet call is retried in halves on out-of-memory: it changes no job state, so a retry is safe.
        predictions: dict[_Job, torch.Tensor] = {}
        self._run_with_oom_split(members, lambda subset: predictions.update(self._predict_noise(subset)))
        for job in members:
            if job in predictions and not job.future.done():
                self._advance(job, predictions[job])
        metrics.BATCH_SIZE.labels(**self._labels).observe(len(predictions))
        metrics.STEP_SECONDS.labels(**self._labels).observe(time.perf_counter() - started)
        if self.config.compile:
            metrics.COMPILED_GRAPHS.labels(**self._labels).set(self.compiled_graphs())
        for job in members:
            if job.on_progress is not None and not job.future.done():
                job.on_progress("step", job.step, len(job.timesteps))

    def _run_with_oom_split(self, members: list[_Job], fn: Callable[[list[_Job]], None]) -> None:
        try:
            fn(members)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(members) == 1:
                logger.warning("out of memory for a single %dx%d image", *reversed(members[0].group))
                self._fail(members[0], OutOfMemory("this image does not fit in GPU memory; ask for a smaller size"))
                return
            half = len(members) // 2
            logger.warning("out of memory with %d images in one call; retrying in halves", len(members))
            self._run_with_oom_split(members[:half], fn)
            self._run_with_oom_split(members[half:], fn)

    def _predict_noise(self, members: list[_Job]) -> dict[_Job, torch.Tensor]:
        """One UNet call for ``members``, each at its own timestep; the guided noise prediction per job."""
        inputs, contexts, timesteps = [], [], []
        for job in members:
            t = job.timesteps[job.step]
            x = job.scheduler.scale_model_input(job.latents, t)
            t = t.to(torch.float32).reshape(1)  # the UNet embeds timesteps as float32 either way
            if job.uncond is not None:
                inputs += [x, x]
                contexts += [job.uncond, job.cond]
                timesteps += [t, t]
            else:
                inputs.append(x)
                contexts.append(job.cond)
                timesteps.append(t)
        noise = self._call_unet(torch.cat(inputs), torch.cat(timesteps), torch.cat(contexts))
        predictions, row = {}, 0
        for job in members:
            if job.uncond is not None:
                uncond, text = noise[row : row + 1], noise[row + 1 : row + 2]
                predictions[job] = uncond + job.params.guidance_scale * (text - uncond)
                row += 2
            else:
                predictions[job] = noise[row : row + 1]
                row += 1
        return predictions

    def _advance(self, job: _Job, prediction: torch.Tensor) -> None:
        """Step one job's own scheduler; a failure there fails that job only."""
        try:
            t = job.timesteps[job.step]
            job.latents = job.scheduler.step(prediction, t, job.latents, **job.step_kwargs, return_dict=False)[0]
            job.step += 1
        except Exception as exc:
            if _is_oom(exc) or isinstance(exc, _DEVICE_ERRORS):
                raise
            logger.exception("scheduler %s failed at step %d", job.params.scheduler, job.step)
            self._fail(job, GenerationFailed(f"the {job.params.scheduler} scheduler failed at step {job.step}"))

    def _launch_decode(self, jobs: list[_Job]) -> None:
        """Queue the decode of finished jobs and the copy of their pixels to the host; wait for neither."""
        latents = torch.cat([job.latents for job in jobs])
        images = self._call_decode(latents / self.pipe.vae.config.scaling_factor)
        finite = torch.isfinite(images).flatten(1).all(dim=1)
        pixels = _to_pixels(images)
        copied = None
        if pixels.is_cuda:
            host_pixels = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host_finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
            host_pixels.copy_(pixels, non_blocking=True)
            host_finite.copy_(finite, non_blocking=True)
            pixels, finite = host_pixels, host_finite
            copied = torch.cuda.Event()
            copied.record()
        with self._cond:
            leaving = set(jobs)
            self._active = [job for job in self._active if job not in leaving]
            self._finishing.append(_PendingDecode(jobs, latents, images, pixels, finite, copied))

    def _finish(self, pending: list[_PendingDecode]) -> None:
        """Answer decoded images. A decode stays listed in ``_finishing`` until it is answered, so wait_idle and
        close see its jobs; only an unrecoverable device error leaves it there (and propagates)."""
        for decode in pending:
            with self._cond:
                if decode not in self._finishing:  # failed meanwhile by close()
                    continue
            self._answer_with_oom_split(decode)
            with self._cond:
                if decode in self._finishing:
                    self._finishing.remove(decode)
                self._cond.notify_all()

    def _answer_with_oom_split(self, decode: _PendingDecode) -> None:
        try:
            self._answer(decode)
        except Exception as exc:
            if _is_device_failure(exc):
                raise
            if not _is_oom(exc):
                logger.exception("could not finish %d images", len(decode.jobs))
                for job in decode.jobs:
                    self._fail(job, GenerationFailed("the image could not be made"))
                return
            # The float32 redecode or the safety checker did not fit: retry in halves, as for the UNet.
            torch.cuda.empty_cache()
            if len(decode.jobs) == 1:
                self._fail(decode.jobs[0], OutOfMemory("this image does not fit in GPU memory; ask for a smaller size"))
                return
            half = len(decode.jobs) // 2
            for part in (slice(0, half), slice(half, None)):
                self._answer_with_oom_split(
                    _PendingDecode(
                        decode.jobs[part],
                        decode.latents[part],
                        decode.images[part],
                        decode.pixels[part],
                        decode.finite[part],
                        None,  # the copy is complete: _answer waited for it
                    )
                )

    def _answer(self, decode: _PendingDecode) -> None:
        if decode.copied is not None:
            decode.copied.synchronize()
        jobs, images, pixels = decode.jobs, decode.images, decode.pixels
        finite = decode.finite.tolist()
        # NaN latents or a VAE overflow (fp16) would come out as a silent black image: refuse it instead.
        if not all(finite) and images.dtype == torch.float16:
            images, finite = self._decode_in_float32(decode.latents, images, finite)
            pixels = _to_pixels(images).cpu()
        if not all(finite):
            images = torch.nan_to_num(images)  # those jobs fail below; keep the safety checker quiet
        _, nsfw = self.pipe.run_safety_checker(images, self.loaded.device, decode.latents.dtype)
        nsfw = list(nsfw) if nsfw is not None else [False] * len(jobs)
        now = time.monotonic()
        for job, image, ok, flagged in zip(jobs, pixels, finite, nsfw, strict=True):
            if not ok:
                self._fail(job, GenerationFailed("the model produced NaN/Inf values; no image was made"))
                continue
            # A flagged image is replaced by black, as diffusers does. The copy detaches the picture from the
            # pinned buffer, which is reused once this decode is dropped.
            picture = Image.new("RGB", image.shape[1::-1]) if flagged else Image.fromarray(image.numpy().copy())
            result = GenerationResult(picture, job.params, job.prompt_truncated, bool(flagged), now - job.submitted_at)
            if self._resolve(job, result):
                metrics.IMAGES.labels(**self._labels).inc()
                metrics.REQUEST_SECONDS.labels(**self._labels).observe(result.seconds)
            elif job.abandoned():  # the client left while its image was being finished
                metrics.FAILURES.labels(error_type="cancelled", **self._labels).inc()

    def _decode_in_float32(
        self, latents: torch.Tensor, images: torch.Tensor, finite: list[bool]
    ) -> tuple[torch.Tensor, list[bool]]:
        """fp16 VAEs can overflow on some latents; decode those again with a float32 copy of the VAE."""
        if self._vae_float32 is None:
            logger.warning("the float16 VAE overflowed; decoding such images in float32 from now on")
            self._vae_float32 = copy.deepcopy(self.pipe.vae).to(torch.float32)
        bad = [index for index, ok in enumerate(finite) if not ok]
        scaled = latents[bad].to(torch.float32) / self.pipe.vae.config.scaling_factor
        images = images.clone()
        images[bad] = self._vae_float32.decode(scaled, return_dict=False)[0].to(images.dtype)
        return images, torch.isfinite(images).flatten(1).all(dim=1).tolist()

    # ---- bookkeeping ----------------------------------------------------------------------------

    def _retire(self) -> None:
        """Forget jobs that are answered, failed or abandoned; wake anyone waiting for idleness."""
        with self._cond:
            for job in self._active:
                if job.abandoned():
                    metrics.FAILURES.labels(error_type="cancelled", **self._labels).inc()
            self._active = [job for job in self._active if not job.future.done()]
            live = {job.group for job in self._active}
            self._group_turns = collections.deque(g for g in self._group_turns if g in live)
            metrics.ACTIVE_IMAGES.labels(**self._labels).set(len(self._active))
            self._cond.notify_all()

    def _resolve(self, job: _Job, result: GenerationResult) -> bool:
        try:
            job.future.set_result(result)
            return True
        except InvalidStateError:  # cancelled meanwhile
            return False

    def _fail(self, job: _Job, error: PredictorError) -> None:
        try:
            job.future.set_exception(error)
        except InvalidStateError:
            return
        metrics.FAILURES.labels(error_type=error.error_type, **self._labels).inc()

    def _fail_all_active(self, exc: BaseException) -> None:
        """Fail the jobs in flight after ``exc``. Images already decoded are still answered unless the device
        itself failed."""
        if isinstance(exc, Exception) and not _is_device_failure(exc) and self._finishing:
            try:
                self._finish(list(self._finishing))
            except Exception:
                logger.exception("could not answer the images decoded before the failure")
        message = "image generation failed on the server"
        if _is_device_failure(exc):
            # An unrecoverable device error: stop taking work so the liveness probe restarts the pod.
            self.healthy = False
            message = "the GPU failed; the server is restarting"
        for job in self._active + [job for decode in self._finishing for job in decode.jobs]:
            self._fail(job, GenerationFailed(message))
        with self._cond:
            self._finishing.clear()
        if not self.healthy:
            with self._cond:
                for job in self._waiting:
                    self._fail(job, DeviceFailed("the GPU is in a failed state; the server is restarting"))
                self._waiting.clear()
