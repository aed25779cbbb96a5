"""``SlotRows``: the ``RowLoRA`` strategy for ``--compile``: fixed slots in the denoiser, adapters swapped in place,
never a recompile.

torch.compile traces the denoiser's layers as they are when it compiles, and PEFT adding a LoRA layer afterwards
would make dynamo compile again (diffusers' hot-swap exists for that reason, one adapter at a time). Here, before
compiling, every layer that some adapter of --lora_dir changes gets a forward hook and fixed buffers:
``--max_loaded_loras`` slots, each as wide as the largest rank any adapter has at that layer. Loading an adapter
reads it as in eager mode (diffusers' ``load_lora_weights``, PEFT's layers), copies its weights into a free slot and
takes PEFT's layers out again, which restores the very modules that were compiled. Each call's rows say which slots
apply at which scale through one small tensor. Buffers change in place, so the compiled graphs, and CUDA graphs
(which replay from the buffers' addresses), serve every adapter and every mix of them in one batch.

Per layer: ``y = base(x) + up(row_scales * down(x))``. ``down`` stacks each slot's ``lora_A`` (slot k owns rows
k*R to k*R + r, zeros past the adapter's own rank r), ``up`` each slot's ``lora_B * lora_alpha / r`` (PEFT's
scaling), and ``row_scales`` holds each row's request scale per slot (zero where a row does not use a slot), so a
row gets exactly the sum PEFT adds after ``set_adapters``. A call with no adapter rows skips the terms: two
variants of each graph, both compiled at warm-up.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from predictor.lora.layers import changed_layers, lora_layers, peft_scaling
from predictor.lora.library import LoraSet
from predictor.lora.rows import RowLoRA


@dataclass(frozen=True)
class LayerWeights:
    down: torch.Tensor  # lora_A's weight: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # lora_B's weight times PEFT's scaling: (out, r) or (out, r, 1, 1)


def take_weights(denoiser: torch.nn.Module, name: str) -> dict[str, LayerWeights]:
    """Adapter ``name``'s weights from the PEFT layers diffusers has just put in the denoiser, by layer name; then
    PEFT's layers out of the denoiser, whatever happens (its own modules back, as they were compiled). A ValueError
    for what the slots cannot serve."""
    try:
        weights: dict[str, LayerWeights] = {}
        for layer_name, layer in changed_layers(lora_layers([denoiser]), name):
            base = layer.get_base_layer()
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            if lora_b.bias is not None:
                raise ValueError(f"{layer_name}: LoRA with a bias term is not served")
            if isinstance(base, torch.nn.Conv2d):
                geometry = ("kernel_size", "stride", "padding", "dilation", "groups")
                if any(getattr(lora_a, key) != getattr(base, key) for key in geometry) or base.padding_mode != "zeros":
                    raise ValueError(f"{layer_name}: a LoRA convolution unlike its layer's is not served")
            elif not isinstance(base, torch.nn.Linear):
                raise ValueError(f"{layer_name}: LoRA on a {type(base).__name__} is not served with --compile")
            down = lora_a.weight.detach().clone()
            up = (lora_b.weight.float() * peft_scaling(layer, name)).to(lora_b.weight.dtype)
            # Every row's call multiplies every slot (by zero where unused): one NaN would spoil every image.
            if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise ValueError(f"{layer_name}: its weights are not all finite")
            weights[layer_name] = LayerWeights(down, up)
        return weights
    finally:
        denoiser.unload_lora()


class SlotRows(RowLoRA):
    """The slots of every layer adapters change, which adapter is in which slot, and the rows' scales (the worker
    thread's). ``ranks``: the largest rank of any adapter at each layer it changes, by layer name."""

    def __init__(self, denoiser: torch.nn.Module, ranks: dict[str, int], capacity: int, max_rows: int) -> None:
        weight = next(denoiser.parameters())
        self.denoiser = denoiser
        self.capacity = capacity
        self._slot_of: dict[str, int] = {}  # adapter in a slot -> its slot
        self.max_rows = max_rows = max(max_rows, 2)  # a lone unguided row is padded to two for the compiled call
        self.active = False  # whether the current call has adapter rows (dynamo guards on it: two graphs)
        self.scales = torch.zeros((max_rows, capacity), device=weight.device, dtype=weight.dtype)
        self._host_scales = torch.zeros((max_rows, capacity), dtype=weight.dtype)
        self._layers: dict[str, torch.nn.Module] = {}
        for layer_name, rank in ranks.items():
            layer = denoiser.get_submodule(layer_name)
            width = capacity * rank
            if isinstance(layer, torch.nn.Conv2d):
                down_shape = (width, layer.in_channels, *layer.kernel_size)
                up_shape: tuple[int, ...] = (layer.out_channels, width, 1, 1)
            else:
                down_shape, up_shape = (width, layer.in_features), (layer.out_features, width)
            made = {"device": layer.weight.device, "dtype": layer.weight.dtype}
            # Buffers, not plain attributes: compiled code reads them in place, and CUDA graphs keep their addresses.
            layer.register_buffer("slot_down", torch.zeros(down_shape, **made), persistent=False)
            layer.register_buffer("slot_up", torch.zeros(up_shape, **made), persistent=False)
            layer.register_buffer("slot_scales", self.scales, persistent=False)
            layer.register_forward_hook(self._add_slots)
            self._layers[layer_name] = layer

    # ---- RowLoRA ---------------------------------------------------------------------------------------

    def take(self, name: str) -> int:
        """The adapter's weights out of PEFT's layers (which leave the denoiser) into a free slot: the caller made
        room (``Residency``). An adapter that changes no layer here still gets a slot, of zeros."""
        weights = take_weights(self.denoiser, name)
        self.check(weights)
        slot = min(set(range(self.capacity)) - set(self._slot_of.values()))
        self.write(slot, weights)
        self._slot_of[name] = slot
        return len(weights)

    def drop(self, name: str) -> None:
        self._slot_of.pop(name, None)  # the next adapter in the slot overwrites all of it

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    @contextmanager
    def rows(self, sets: Sequence[LoraSet]) -> Iterator[None]:
        self.set_rows([[(self._slot_of[name], scale) for name, scale in loras] for loras in sets])
        try:
            yield
        finally:
            self.active = False

    def graph_variants(self) -> tuple[AbstractContextManager[None], ...]:
        """Dynamo guards on ``active``: the graph without adapter terms and the one with them, both compiled at
        warm-up (the second with every scale zero)."""
        return self._activity(False), self._activity(True)

    @contextmanager
    def _activity(self, active: bool) -> Iterator[None]:
        self.active = active
        try:
            yield
        finally:
            self.active = False

    # ---- the slots ------------------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """Device memory the slots take."""
        tensors = [t for layer in self._layers.values() for t in (layer.slot_down, layer.slot_up)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _add_slots(self, layer: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return output
        down, up = layer.slot_down, layer.slot_up
        x = args[0].to(down.dtype)
        rows, slots = x.shape[0], self.capacity
        scales = layer.slot_scales[:rows]
        if down.dim() == 2:
            h = F.linear(x, down)
            h = h.unflatten(-1, (slots, -1)) * scales.view(rows, *([1] * (h.dim() - 2)), slots, 1)
            delta = F.linear(h.flatten(-2), up)
        else:
            h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            h = h.unflatten(1, (slots, -1)) * scales.view(rows, slots, 1, 1, 1)
            delta = F.conv2d(h.flatten(1, 2), up)
        return (output + delta).to(output.dtype)

    def check(self, weights: dict[str, LayerWeights]) -> None:
        """A ValueError when the weights do not fit the slots (a file changed since the start)."""
        for layer_name, layer_weights in weights.items():
            layer = self._layers.get(layer_name)
            if layer is None:
                raise ValueError(f"it changes {layer_name}, which no adapter changed at start (file changed?)")
            rank = layer.slot_down.shape[0] // self.capacity
            down, up = layer_weights.down, layer_weights.up
            fits = down.shape[1:] == layer.slot_down.shape[1:] and up.shape[0] == layer.slot_up.shape[0]
            if down.shape[0] > rank or not fits:
                raise ValueError(f"its {layer_name} weights are not the shape checked at start (file changed?)")

    def write(self, slot: int, weights: dict[str, LayerWeights]) -> None:
        """Put an adapter's weights, already passed by ``check``, in slot ``slot``; zeros in the layers it leaves
        alone."""
        for layer_name, layer in self._layers.items():
            rank = layer.slot_down.shape[0] // self.capacity
            start = slot * rank
            layer.slot_down[start : start + rank].zero_()
            layer.slot_up[:, start : start + rank].zero_()
            layer_weights = weights.get(layer_name)
            if layer_weights is not None:
                used = layer_weights.down.shape[0]
                layer.slot_down[start : start + used].copy_(layer_weights.down)
                layer.slot_up[:, start : start + used].copy_(layer_weights.up)

    def set_rows(self, slots_per_row: Sequence[Sequence[tuple[int, float]]]) -> None:
        """Each row's (slot, scale) pairs for the calls that follow; rows past the list get none."""
        if len(slots_per_row) > self.max_rows:
            raise ValueError(f"{len(slots_per_row)} rows, more than the {self.max_rows} the slots were made for")
        self.active = any(slots_per_row)
        if not self.active:  # the graph without adapter terms reads no scale: no copy to the device
            return
        host = self._host_scales.zero_()
        for row, pairs in enumerate(slots_per_row):
            for slot, scale in pairs:
                host[row, slot] += scale
        self.scales.copy_(host)
