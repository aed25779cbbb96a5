"""Applying loaded adapters row by row: the one interface, and its eager strategy.

``RowLoRA`` is how one part of the model (the denoiser, or the text encoders) applies the adapters diffusers has
loaded: ``take`` an adapter just loaded, ``drop`` one taken out, and ``rows(sets)`` around a call so that row i
gets the adapters of ``sets[i]`` at their scales, each row's in its own order (PEFT adds active adapters in that
order). Two strategies, chosen once at start: ``PeftHookRows`` here (eager), and ``SlotRows`` (``slots.py``,
``--compile``: the denoiser's modules never change).

``PeftHookRows`` keeps PEFT's own LoRA path off on every LoRA layer and adds, with a forward hook, exactly the term
PEFT adds after ``set_adapters``: ``lora_B(lora_A(x)) * scale * lora_alpha / r`` to the rows that asked for that
adapter at that scale. Rows with the same adapters sit side by side, so each block is one slice; a row without
adapters gets the base layer's output untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from predictor.lora.layers import changed_layers, lora_layers, peft_scaling
from predictor.lora.library import LoraSet


class RowLoRA(ABC):
    """How one part of the model applies the loaded adapters, row by row (the worker thread's)."""

    @abstractmethod
    def take(self, name: str) -> int:
        """Adapter ``name`` has just been loaded into the pipeline by diffusers: make it apply here, row by row.
        Returns how many layers it changes here; raises ValueError for what is not served."""

    @abstractmethod
    def drop(self, name: str) -> None:
        """Adapter ``name`` has been taken out of the pipeline (or its load failed): forget it here."""

    @abstractmethod
    def rows(self, sets: Sequence[LoraSet]) -> AbstractContextManager[None]:
        """Around calls whose row i takes the adapters ``sets[i]``; rows with equal sets should be side by side."""

    def graph_variants(self) -> tuple[AbstractContextManager[None], ...]:
        """The states a compiled caller must warm up under, one graph each (one: this strategy changes nothing
        dynamo guards on)."""
        return (nullcontext(),)


def blocks(sets: Sequence[LoraSet]) -> list[tuple[int, int | None, LoraSet]]:
    """Runs of consecutive rows with the same adapters, as (start, stop, adapters); stop None: every row. Rows
    without adapters are left out."""
    plan: list[tuple[int, int | None, LoraSet]] = []
    start = 0
    for index in range(1, len(sets) + 1):
        if index == len(sets) or sets[index] != sets[start]:
            if sets[start]:
                plan.append((start, None if (start, index) == (0, len(sets)) else index, sets[start]))
            start = index
    return plan


class PeftHookRows(RowLoRA):
    """Eager: PEFT's layers in ``modules`` stay, disabled; a forward hook on each adds each row's adapters."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.modules = list(modules)
        self._layers: list[Any] = []  # every LoRA layer in the modules, as of the last take
        self._hooked: set[int] = set()
        self._plan: list[tuple[int, int | None, LoraSet]] = []  # the current call's blocks of rows

    def take(self, name: str) -> int:
        layers = lora_layers(self.modules)
        changed = changed_layers(layers, name)
        self._layers = [layer for _, layer in layers]
        self._disable_peft()
        for layer in self._layers:
            if id(layer) not in self._hooked:
                layer.register_forward_hook(self._add_rows, with_kwargs=True)
                self._hooked.add(id(layer))
        return len(changed)

    def drop(self, name: str) -> None:
        self._disable_peft()  # deleting an adapter may make PEFT's path active again

    def _disable_peft(self) -> None:
        """PEFT's own path off: each layer gives the base layer's output as it is; the hook adds the rows'."""
        for layer in self._layers:
            layer.enable_adapters(False)

    @contextmanager
    def rows(self, sets: Sequence[LoraSet]) -> Iterator[None]:
        self._plan = blocks(sets)
        try:
            yield
        finally:
            self._plan = []

    def _add_rows(self, layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """PEFT's LoRA term for each block of rows and each of its adapters, summed in order."""
        if not self._plan:
            return output
        x = args[0] if args else kwargs["x"]
        for start, stop, loras in self._plan:
            part = x if stop is None else x[start:stop]
            block = output if stop is None else output[start:stop]
            for name, scale in loras:
                if name not in layer.lora_A:
                    continue
                lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
                delta = lora_b(lora_a(layer.lora_dropout[name](part.to(lora_a.weight.dtype))))
                block = (block + delta * peft_scaling(layer, name, scale)).to(output.dtype)
            if stop is None:
                output = block
            else:
                output[start:stop] = block  # the other rows keep the base layer's output as it is
        return output
