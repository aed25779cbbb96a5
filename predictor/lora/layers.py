"""What loading an adapter puts into the model, and what is served of it.

An adapter is read by diffusers' own ``load_lora_weights`` (every format it reads: diffusers/PEFT with its
metadata, kohya), which wraps each layer it changes in a PEFT ``LoraLayer``. This module reads (``read_into``),
finds those layers (``lora_layers``), says which of them an adapter changes and refuses the kinds not served
(``changed_layers``: DoRA and other variants, embedding adapters), and holds PEFT's scaling (``peft_scaling``):
the only places these facts are written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch


class DoesNotFit(Exception):
    """An adapter that does not fit the model (another family's or architecture's, or a kind not served)."""


def read_into(pipe: Any, directory: str, file_name: str, name: str) -> None:
    """Load the adapter in ``directory/file_name`` into ``pipe`` under ``name``, by path, so diffusers reads the
    file's own metadata (lora_alpha, rslora, per-layer ranks). Raises what diffusers and PEFT raise."""
    with warnings.catch_warnings():  # PEFT warns at each adapter after the first: several are the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        pipe.load_lora_weights(directory, weight_name=file_name, adapter_name=name, local_files_only=True)


def delete_from(pipe: Any, name: str) -> None:
    """Take adapter ``name`` out of every component of ``pipe`` (PEFT's wrappers stay, holding no adapter)."""
    with warnings.catch_warnings():  # PEFT says which adapter it makes active instead: none is, here
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        pipe.delete_adapters([name])


def lora_layers(modules: Iterable[torch.nn.Module]) -> list[tuple[str, Any]]:
    """Every PEFT LoRA layer in ``modules``, by its name within its module."""
    from peft.tuners.lora import LoraLayer

    return [
        (layer_name, layer)
        for module in modules
        for layer_name, layer in module.named_modules()
        if isinstance(layer, LoraLayer)
    ]


def changed_layers(layers: Iterable[tuple[str, Any]], name: str) -> list[tuple[str, Any]]:
    """The layers adapter ``name`` changes among ``layers``; a ValueError for a kind of adapter not served."""
    changed = []
    for layer_name, layer in layers:
        if name in getattr(layer, "lora_embedding_A", {}):
            raise ValueError(f"{layer_name}: embedding adapters are not served, only plain LoRA")
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}):
            raise ValueError(f"{layer_name}: DoRA adapters are not served, only plain LoRA")
        changed.append((layer_name, layer))
    return changed


def peft_scaling(layer: Any, name: str, scale: float = 1.0) -> float:
    """The factor PEFT puts on adapter ``name``'s ``lora_B(lora_A(x))`` in ``layer`` after ``set_adapters`` with
    ``scale``: ``scale * lora_alpha / r`` (``/ sqrt(r)`` with rslora), computed in PEFT's order (``set_scale``)."""
    rank = math.sqrt(layer.r[name]) if layer.use_rslora.get(name, False) else layer.r[name]
    return scale * layer.lora_alpha[name] / rank


def first_cause(exc: Exception) -> str:
    """One line of a load error: the first shape mismatch of torch's list (another architecture's adapter)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return next((line for line in lines if line.startswith("size mismatch")), lines[0])[:300]
