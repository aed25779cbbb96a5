"""torch.compile for any family's denoiser and decoder, without recompiling under requests.

The denoiser is compiled once with a dynamic batch dimension. With CUDA graphs (``--compile_mode
reduce-overhead`` on CUDA) a graph is recorded per bucket of rows (2, 4, 8, ... up to the most rows a step
can bring) and every call is padded up to the next bucket; without them the compiled graph takes any row
count, and warm-up runs each one so a guard split compiles before the server is ready, not under a request.
The decoder is compiled for one image and decodes a batch image by image.

A family whose transformer takes ragged inputs (Z-Image: each caption at its own length, padded and masked by the
model's own code) is compiled by region instead: each of its repeated blocks with dynamic batch and sequence
dimensions, the model's glue eager. Its graphs, a few per block kind, are all made in warm-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from predictor.config import EngineConfig

logger = logging.getLogger(__name__)

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

# (sample, timesteps, other tensor inputs by keyword) for a given number of rows.
ExampleInputs = Callable[[int], tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]


def compile_phases() -> str:
    """Where torch.compile spent its time, from its own timers (an empty string where they are missing)."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
    except Exception:  # private API: its shape may change between torch releases
        return ""
    seconds = dict(zip(names, values, strict=False))
    parts = [f"{label} {float(seconds[name]):.1f} s" for name, label in _COMPILE_PHASES.items() if name in seconds]
    return "torch.compile timers: " + ", ".join(parts) if parts else ""


def compile_cache_counts() -> tuple[int, int]:
    """(hits, misses) of inductor's FX graph cache: a restart on a warm --compile_cache_dir has no misses."""
    from torch._dynamo.utils import counters

    cache = counters["inductor"]
    return cache["fxgraph_cache_hit"], cache["fxgraph_cache_miss"]


def batch_buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two up to ``max_rows``, and ``max_rows`` itself: the row counts CUDA graphs are recorded for."""
    buckets, size = [], 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    buckets.append(max_rows if max_rows > 0 else 1)
    return tuple(dict.fromkeys(buckets))


def _pad_rows(value: Any, rows: int) -> Any:
    """``value`` (a tensor, or a dict of them as SDXL's added conditions) with zero rows added up to ``rows``."""
    if isinstance(value, dict):
        return {key: _pad_rows(item, rows) for key, item in value.items()}
    if not isinstance(value, torch.Tensor) or value.shape[0] == rows:
        return value
    return torch.cat([value, value.new_zeros((rows - value.shape[0], *value.shape[1:]))])


def _contiguous(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _contiguous(item) for key, item in value.items()}
    return value.contiguous() if isinstance(value, torch.Tensor) else value


def _mark_batch_dynamic(value: Any) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _mark_batch_dynamic(item)
    elif isinstance(value, torch.Tensor):
        # "maybe": a backend that needs a fixed batch size compiles per size (all at warm-up) instead of failing.
        torch._dynamo.maybe_mark_dynamic(value, 0)


def compile_options(config: EngineConfig, mode: str, dynamic: bool | None) -> dict[str, Any]:
    chosen: dict[str, Any] = {"backend": config.compile_backend, "fullgraph": True, "dynamic": dynamic}
    if config.compile_backend == "inductor":
        chosen["mode"] = mode
    return chosen


class CompiledDenoiser:
    """A denoiser module (UNet or transformer) under torch.compile, called as ``(sample, timesteps, **inputs)``."""

    def __init__(self, module: torch.nn.Module, config: EngineConfig, max_rows: int, cuda_graphs: bool) -> None:
        self.cuda_graphs = cuda_graphs
        self.max_rows = max_rows
        # A lone unguided image has one row; one row would specialise the dynamic batch dimension, so it is
        # padded to two, and no bucket of one exists.
        self.buckets = tuple(b for b in batch_buckets(max_rows) if b > 1) if cuda_graphs else ()
        self._fn = torch.compile(module, **compile_options(config, config.compile_mode, None))

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, **inputs: Any) -> torch.Tensor:
        rows = sample.shape[0]
        bucket = next((b for b in self.buckets if b >= rows), max(rows, 2))
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        padded = {key: _contiguous(_pad_rows(value, bucket)) for key, value in inputs.items()}
        # Contiguous: dynamo guards on strides, and an image job's latents can arrive channels-last.
        sample = _contiguous(_pad_rows(sample, bucket))
        noise = self._fn(sample, _pad_rows(timesteps, bucket), **padded, return_dict=False)[0]
        # A CUDA graph's output lives in memory the next replay overwrites: keep a copy.
        return noise[:rows].clone() if self.cuda_graphs else noise[:rows]

    def warm_up(self, example: ExampleInputs, synchronize: Callable[[], None]) -> tuple[float, float]:
        """Compile, then run every row count a request can bring (CUDA graph trees need three runs per bucket:
        warm up, record, replay), so no request compiles or records anything. Returns the seconds of each part."""
        started = time.perf_counter()
        sample, timesteps, inputs = example(2)
        for value in (sample, timesteps, inputs):
            _mark_batch_dynamic(value)
        self(sample, timesteps, **inputs)
        synchronize()
        compiled = time.perf_counter()
        if self.cuda_graphs:
            row_counts, repeats = self.buckets, 3
        else:
            row_counts, repeats = tuple(range(2, self.max_rows + 1)), 1
        for rows in row_counts:
            for _ in range(repeats):
                sample, timesteps, inputs = example(rows)
                self(sample, timesteps, **inputs)
        synchronize()
        return compiled - started, time.perf_counter() - compiled

    def describe(self) -> str:
        if self.cuda_graphs:
            return f"CUDA graphs for {len(self.buckets)} batch sizes"
        return "dynamic batch size"


def _compact_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _mark_ragged(value: Any) -> Any:
    """A block's tensor input, contiguous (dynamo guards on strides: the model slices its padded sequences), with
    the batch dimension dynamic, and the sequence dimension too: the second of a sequence tensor (three or more
    dimensions) and of the boolean attention mask. Feature dimensions stay static, so kernels keep their sizes."""
    if isinstance(value, tuple | list):  # Qwen-Image's rotary embeddings: (image frequencies, text frequencies)
        return type(value)(_mark_ragged(item) for item in value)
    if not isinstance(value, torch.Tensor):
        return value
    if value.stride() != _compact_strides(value.shape):  # contiguous() keeps a slice's stride on a size-1 dimension
        value = torch.empty(value.shape, dtype=value.dtype, device=value.device).copy_(value)
    torch._dynamo.maybe_mark_dynamic(value, 0)
    if value.dim() >= 3 or (value.dim() == 2 and value.dtype == torch.bool):
        torch._dynamo.maybe_mark_dynamic(value, 1)
    return value


def _ragged_forward(compiled: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return compiled(*map(_mark_ragged, args), **{key: _mark_ragged(value) for key, value in kwargs.items()})

    return forward


class CompiledBlocks:
    """A transformer compiled by region: each block its class names in ``_repeated_blocks`` (diffusers' list for
    regional compilation) under torch.compile with dynamic batch and sequence sizes, called through the family's
    eager call. Any row count, caption length and image size then runs without compiling; a graph exists per block
    kind (with and without adaptive modulation), per attention mask (none when a batch's sequences are equal) and
    for one row (dynamo specialises a size of one), each made in warm-up. No CUDA graphs: shapes vary by request."""

    cuda_graphs = False

    def __init__(self, module: torch.nn.Module, call: torch.nn.Module, config: EngineConfig, max_rows: int) -> None:
        kinds = tuple(getattr(module, "_repeated_blocks", ()))
        self.blocks = [block for block in module.modules() if type(block).__name__ in kinds]
        if not self.blocks:
            raise ValueError(f"{type(module).__name__} names no repeated blocks to compile by region")
        self.max_rows = max_rows
        self._call = call
        mode = "default" if config.compile_mode == "reduce-overhead" else config.compile_mode
        options = compile_options(config, mode, None)
        # Every block shares one code object, so its variants (block kinds x masks x one row or several, twice
        # with adapter slots) are entries of one cache: more than dynamo's default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in self.blocks:
            block.forward = _ragged_forward(torch.compile(block.forward, **options))

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, **inputs: Any) -> torch.Tensor:
        return self._call(sample, timesteps, **inputs, return_dict=False)[0]

    def warm_up(self, example: Callable[..., Any], synchronize: Callable[[], None]) -> tuple[float, float]:
        """Compile on two rows of unequal captions, then run every row count, with equal and unequal captions, so
        no request compiles. ``example(rows, ragged=...)`` gives the inputs. Returns the seconds of each part."""
        started = time.perf_counter()
        sample, timesteps, inputs = example(2, ragged=True)
        self(sample, timesteps, **inputs)
        synchronize()
        compiled = time.perf_counter()
        for rows in range(1, self.max_rows + 1):
            for ragged in (False, True) if rows > 1 else (False,):
                sample, timesteps, inputs = example(rows, ragged=ragged)
                self(sample, timesteps, **inputs)
        synchronize()
        return compiled - started, time.perf_counter() - compiled

    def describe(self) -> str:
        return f"{len(self.blocks)} blocks by region, dynamic batch and sequence sizes"


class CompiledDecoder:
    """A decode function under torch.compile for one image at a time (it runs once per image, not per step:
    CUDA graphs would buy little and cost memory)."""

    def __init__(self, decode: Callable[..., Any], config: EngineConfig) -> None:
        mode = "default" if config.compile_mode == "reduce-overhead" else config.compile_mode
        self._fn = torch.compile(decode, **compile_options(config, mode, False))

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.contiguous()  # dynamo guards on strides
        return torch.cat([self._fn(latents[i : i + 1], return_dict=False)[0] for i in range(len(latents))])
