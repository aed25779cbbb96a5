"""Per-request LoRA adapters: the files of ``--lora_dir``, which of them are in the model, and how each row of a
denoiser call gets its own.

Modules, lowest first; the package imports nothing of the server above ``errors``, ``device``, ``request`` (the
name pattern, request types), ``jobs`` (types) and ``scheduler`` (``AdapterLimit``):

- ``library``: ``LoraLibrary``, the files (scan and checks at start, refusals, ``prefetch``, the listing), shared
  by the request threads and the worker.
- ``layers``: what a load puts into the model (diffusers' ``load_lora_weights``, PEFT's ``LoraLayer``), the one
  refusal of adapter kinds not served (DoRA, embeddings) and PEFT's scaling.
- ``residency``: ``Residency``, least recently used out past --max_loaded_loras, never an adapter a live job
  holds (decoding jobs included, until their images are answered).
- ``rows``: ``RowLoRA``, the one interface for applying adapters row by row, and its eager strategy
  ``PeftHookRows`` (PEFT's layers disabled, a forward hook adds each row's term).
- ``slots``: the compiled strategy ``SlotRows`` (--compile: fixed slots made before compiling, swapped in place).
- ``adapters``: ``RowAdapters``, the one component a runner holds.

The runner's side (``RowAdapters``; every call on the worker thread unless said otherwise):

- ``RowAdapters(pipe, denoiser, library, max_loaded=..., slots=..., grouped=...)``: the denoiser's strategy is
  chosen here, once (slots with --compile; the text encoders are always eager).
- ``admission_limit()``: the scheduler's ``AdapterLimit`` with slots, else None (asked once, by the engine).
- ``batch_key(params, family_key)``: the batch key, with the adapter set in it under --lora_batching grouped.
- ``install_for_compile(max_rows)`` then ``graph_variants()``: before compiling, make the slots; warm the
  compiled denoiser up once under each context returned (the graphs with and without adapter rows).
- ``prepare(jobs)``: load what new jobs name, evict what no live job holds; raises a job's error (400 when it does
  not fit the model).
- ``encode_grouped(jobs, encode)``: ``encode`` once per adapter set, with that set in the text encoders.
- ``side_by_side(jobs)`` then ``rows(per_row_sets)`` around the denoiser call: row i gets ``per_row_sets[i]``.
- ``loaded``: the adapters in the model, least recently used first.
"""

from predictor.lora.adapters import RowAdapters
from predictor.lora.library import SUFFIX, LoraFile, LoraLibrary, LoraSet
from predictor.lora.residency import Residency
from predictor.lora.rows import PeftHookRows, RowLoRA
from predictor.lora.slots import SlotRows

__all__ = [
    "SUFFIX",
    "LoraFile",
    "LoraLibrary",
    "LoraSet",
    "PeftHookRows",
    "Residency",
    "RowAdapters",
    "RowLoRA",
    "SlotRows",
]
