"""Per-request LoRA adapters: the directory they come from, and the rows they apply to.

``LoraLibrary`` is the operator's ``--lora_dir``: one adapter per ``.safetensors`` file, named by its stem, checked
at start (name, no link out of the directory, size, a readable safetensors header with LoRA weights). A file that
fails is listed with the reason and refused by name; one that turns out not to fit the model at first use (another
family's, another architecture's) is refused from then on. When a request naming an adapter not in the model is
parsed, the kernel is asked to read its file ahead (``prefetch``), so the worker's read comes from memory.

``LoraAdapters`` (the worker thread's) loads adapters into the pipeline with diffusers' own ``load_lora_weights``
(every format it reads: diffusers/PEFT with its metadata, kohya), keeps at most ``--max_loaded_loras`` of them
(least recently used out first), and applies them row by row: PEFT's own LoRA path stays off, and a forward hook on
each LoRA layer adds ``lora_B(lora_A(x)) * scaling`` to the rows that asked for that adapter at that scale, exactly
the term PEFT adds after ``set_adapters`` (``scaling = scale * lora_alpha / r``). Rows with the same adapters sit
side by side, so each block is a slice. So one denoiser call serves rows with different adapter sets, and a row
without adapters gets the base layer's output untouched.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from predictor.errors import GenerationFailed, InvalidRequest, LoadError, PredictorError
from predictor.schemas import LORA_NAME_PATTERN

if TYPE_CHECKING:
    from predictor.lora_slots import DenoiserSlots

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_NAME = re.compile(LORA_NAME_PATTERN)

# A request's adapters: (name, scale) in the order given (PEFT adds active adapters in that order).
LoraSet = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    bytes: int
    refused: str | None = None  # why it cannot be used; None: usable

    def describe(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "bytes": self.bytes, "available": self.refused is None}
        if self.refused is not None:
            entry["reason"] = self.refused
        return entry


class LoraLibrary:
    """The adapters of ``--lora_dir``, read once at start."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._files: dict[str, LoraFile] = {}
        self._loaded: set[str] = set()  # in the model now (the worker's, read by prefetch and the listing)
        self._scan()

    def _scan(self) -> None:
        if not self.directory.is_dir():
            raise LoadError(f"--lora_dir '{self.directory}' is not a directory")
        root = self.directory.resolve()
        for path in sorted(self.directory.iterdir()):
            if path.suffix != SUFFIX or path.name.startswith("."):
                continue
            name = path.stem
            lora = LoraFile(name, path, 0, self._why_refused(path, root))
            if lora.refused is None:
                lora = LoraFile(name, path, path.stat().st_size)
            self._files[name] = lora
        usable = [lora.name for lora in self._files.values() if lora.refused is None]
        logger.info("LoRA adapters in %s: %s", self.directory, ", ".join(usable) or "none")
        for lora in self._files.values():
            if lora.refused is not None:
                logger.warning("LoRA file %s refused: %s", lora.path.name, lora.refused)

    def _why_refused(self, path: Path, root: Path) -> str | None:
        if not _NAME.match(path.stem):
            return "its name must be letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit"
        real = path.resolve()
        if not real.is_relative_to(root):
            return "a link to a file outside --lora_dir"
        if not real.is_file():
            return "not a regular file"
        size = real.stat().st_size
        if size > self.max_bytes:
            return f"{size} bytes, over --max_lora_bytes ({self.max_bytes})"
        try:
            from safetensors import safe_open

            with safe_open(str(real), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types for a bad header
            return f"not a readable safetensors file ({type(exc).__name__})"
        if not any("lora" in key for key in keys):
            return "holds no LoRA weights (no key names 'lora')"
        return None

    # ---- what requests see -------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [lora.describe() for lora in self._files.values()]

    def check(self, loras: LoraSet, param: str) -> None:
        """A 400 for a name that is not here or cannot be used, listing the usable ones."""
        with self._lock:
            for name, _ in loras:
                lora = self._files.get(name)
                if lora is None:
                    usable = ", ".join(n for n, f in self._files.items() if f.refused is None) or "none"
                    raise InvalidRequest(f"unknown LoRA '{name}'; available: {usable}", param=param)
                if lora.refused is not None:
                    raise InvalidRequest(f"LoRA '{name}' cannot be used: {lora.refused}", param=param)

    def refusal(self, name: str) -> str | None:
        with self._lock:
            lora = self._files.get(name)
            return None if lora is None else lora.refused

    def refuse(self, name: str, reason: str) -> None:
        """Refuse a file from now on (it did not fit the model at first use)."""
        with self._lock:
            lora = self._files[name]
            self._files[name] = LoraFile(lora.name, lora.path, lora.bytes, reason)
        logger.warning("LoRA %s refused: %s", name, reason)

    # ---- reading files ------------------------------------------------------------------------------

    def mark_loaded(self, name: str, loaded: bool) -> None:
        with self._lock:
            (self._loaded.add if loaded else self._loaded.discard)(name)

    def loaded_names(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    def prefetch(self, names: Iterable[str]) -> None:
        """Ask the kernel to read the files of adapters not in the model yet into its page cache, off the worker
        thread and without holding them in this process: the worker's read is then a copy from memory."""
        for name in names:
            with self._lock:
                if name in self._loaded or name not in self._files:
                    continue
                path = self._files[name].path
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # the worker's load reports it
            try:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(descriptor)

    def location(self, name: str) -> tuple[str, str]:
        """(directory, file name) of the adapter's file as checked at start, for diffusers' loader (which reads the
        file's own metadata: lora_alpha, rslora, per-layer ranks). Raises OSError when it changed since."""
        with self._lock:
            lora = self._files[name]
        real = lora.path.resolve()
        size = real.stat().st_size
        if not real.is_relative_to(self.directory.resolve()) or size > self.max_bytes:
            raise OSError(f"{lora.path.name} changed since the start: no longer a file within --lora_dir and limits")
        return str(real.parent), real.name


class LoraAdapters:
    """Adapters in the pipeline's denoiser and text encoders, applied per row (the worker thread's). With
    ``install_slots`` (--compile) the denoiser's adapters live in fixed slots instead (``predictor.lora_slots``)."""

    def __init__(self, pipe: Any, library: LoraLibrary, max_loaded: int) -> None:
        self.pipe = pipe
        self.library = library
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._hooked: set[int] = set()
        self._layers: list[Any] = []
        # The current call's adapters: blocks of consecutive rows (start, stop, adapters), stop None: every row.
        self._plan: list[tuple[int, int | None, LoraSet]] = []
        self.slots: DenoiserSlots | None = None  # the denoiser's adapters under --compile
        self._denoiser: Any = None
        self._slot_of: dict[str, int] = {}  # loaded adapter -> its slot

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def _modules(self) -> list[Any]:
        """The pipeline's modules an adapter may change: denoiser and text encoders, not the VAE."""
        import torch

        names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        modules = [getattr(self.pipe, name, None) for name in names]
        # With slots the denoiser keeps no PEFT layer: only the text encoders' are applied row by row here.
        return [m for m in modules if isinstance(m, torch.nn.Module) and m is not self._denoiser]

    def install_slots(self, denoiser: Any, max_rows: int) -> None:
        """Before --compile: read every usable adapter of the library once (refusing, with the reason, those that
        do not fit the model), then give each layer any of them changes --max_loaded_loras slots of the largest rank
        it has there. Adapters then load into slots, and the denoiser's modules never change."""
        from predictor.lora_slots import DenoiserSlots

        started = time.perf_counter()
        self._denoiser = denoiser
        ranks: dict[str, int] = {}
        usable = [entry["name"] for entry in self.library.describe() if entry["available"]]
        for name in usable:
            try:
                weights = self._read(name)
            except OSError as exc:
                self.library.refuse(name, f"could not be read: {exc}")
                continue
            except _DoesNotFit as exc:
                self.library.refuse(name, str(exc))
                continue
            finally:
                self._forget(name)
            for layer_name, layer_weights in weights.items():
                ranks[layer_name] = max(ranks.get(layer_name, 0), layer_weights.down.shape[0])
        self.slots = DenoiserSlots(denoiser, ranks, self.max_loaded, max_rows)
        logger.info(
            "LoRA slots for --compile: %d adapters read in %.1f s; %d layers x %d slots, rank up to %d (%.1f MiB)",
            len(usable),
            time.perf_counter() - started,
            len(ranks),
            self.max_loaded,
            max(ranks.values(), default=0),
            self.slots.bytes / 2**20,
        )

    def ensure(self, sets: Iterable[LoraSet], in_use: Iterable[LoraSet] = ()) -> dict[str, PredictorError]:
        """Load the adapters these sets name that are not in the model yet, then take out the least recently used
        past --max_loaded_loras that no live job names (so the bound is soft: running images keep theirs). With
        slots the bound is hard: an adapter no live job names makes room before a load (the engine admits no more
        adapters at once than there are slots). Returns the adapters that could not be loaded, each with its error
        (400: it does not fit the model)."""
        failed: dict[str, PredictorError] = {}
        wanted = [name for loras in sets for name, _ in loras]
        busy = {name for loras in in_use for name, _ in loras} | set(wanted)
        for name in dict.fromkeys(wanted):
            if name in self._loaded:
                self._loaded.move_to_end(name)
                continue
            refused = self.library.refusal(name)
            if refused is not None:  # found not to fit while this request waited
                failed[name] = InvalidRequest(f"LoRA '{name}' cannot be used: {refused}", param="loras")
                continue
            if self.slots is not None and len(self._loaded) >= self.slots.capacity:
                idle = next((loaded for loaded in self._loaded if loaded not in busy), None)
                if idle is None:  # admission keeps this from happening; never overwrite a running image's adapter
                    failed[name] = GenerationFailed(f"no free slot for LoRA '{name}' (--max_loaded_loras)")
                    continue
                self._unload(idle)
            error = self._load(name)
            if error is not None:
                failed[name] = error
        for name in list(self._loaded):
            if len(self._loaded) <= self.max_loaded:
                break
            if name not in busy:
                self._unload(name)
        return failed

    def _read(self, name: str) -> dict[str, Any]:
        """Load adapter ``name`` with diffusers into the pipeline (text encoders, and the denoiser unless it has
        slots) and check it. With slots, returns its denoiser weights, PEFT's layers taken out of the denoiser
        again. Raises OSError (the file), _DoesNotFit (the model), or the out-of-memory and device errors as they
        are; the caller takes out what a failed load left behind (``_forget``)."""
        from peft.tuners.lora import LoraLayer

        from predictor.device import is_device_error, is_oom
        from predictor.lora_slots import take_weights

        directory, file_name = self.library.location(name)
        try:
            with warnings.catch_warnings():  # PEFT warns at each adapter after the first: several are the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                # By path, so diffusers reads the file's own metadata (lora_alpha, rslora, per-layer ranks).
                self.pipe.load_lora_weights(directory, weight_name=file_name, adapter_name=name, local_files_only=True)
            weights = take_weights(self._denoiser, name) if self._denoiser is not None else {}
            layers = [m for module in self._modules() for m in module.modules() if isinstance(m, LoraLayer)]
            holding = [layer for layer in layers if name in layer.lora_A]
            if not holding and not weights:
                raise ValueError("no layer of this model matches its weights (made for another model family?)")
            if any(name in layer.lora_variant for layer in holding) or any(
                name in getattr(layer, "lora_embedding_A", {}) for layer in layers
            ):
                raise ValueError("DoRA and embedding adapters are not served, only plain LoRA")
            if self.slots is not None:
                self.slots.check(weights)
        except Exception as exc:  # diffusers and PEFT raise ValueError, KeyError, RuntimeError (shapes) and more
            if is_oom(exc) or is_device_error(exc):
                raise  # the engine's to handle (halves, restart); the adapter itself may be fine
            raise _DoesNotFit(f"it does not fit this model: {_first_cause(exc)}") from exc
        self._layers = layers
        logger.debug("read LoRA %s: %d text-encoder layers, %d denoiser layers", name, len(holding), len(weights))
        return weights

    def _load(self, name: str) -> PredictorError | None:
        try:
            weights = self._read(name)
            if self.slots is not None:
                slot = min(set(range(self.slots.capacity)) - set(self._slot_of.values()))
                self.slots.write(slot, weights)
                self._slot_of[name] = slot
        except OSError as exc:  # the file went or changed: not the adapter's fault, and maybe back later
            self._forget(name)
            logger.error("LoRA %s could not be read: %s", name, exc)
            return GenerationFailed(f"LoRA '{name}' could not be read on the server")
        except _DoesNotFit as exc:
            self._forget(name)
            self.library.refuse(name, str(exc))
            return InvalidRequest(f"LoRA '{name}' cannot be used: {exc}", param="loras")
        except BaseException:
            self._forget(name)
            raise
        self._loaded[name] = None
        self.library.mark_loaded(name, True)
        for layer in self._layers:
            # PEFT's own path stays off (the base layer's output as it is); the hook adds each row's adapters.
            layer.enable_adapters(False)
            if id(layer) not in self._hooked:
                layer.register_forward_hook(self._add_rows, with_kwargs=True)
                self._hooked.add(id(layer))
        where = f"slot {self._slot_of[name]}" if name in self._slot_of else "the model"
        logger.info("loaded LoRA %s into %s", name, where)
        return None

    def _forget(self, name: str) -> None:
        """Take out whatever a load left behind (all of it after a failure; the text encoders' part after a probe)."""
        with contextlib.suppress(Exception):  # nothing of it was loaded
            self.pipe.delete_adapters([name])
        if self._denoiser is not None:
            self._denoiser.unload_lora()  # no PEFT layer stays in a denoiser with slots: its compiled modules back

    def _unload(self, name: str) -> None:
        with warnings.catch_warnings():  # PEFT says which adapter it makes active instead: none is, here
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            self.pipe.delete_adapters([name])
        del self._loaded[name]
        self._slot_of.pop(name, None)  # the next adapter in the slot overwrites all of it
        self.library.mark_loaded(name, False)
        for layer in self._layers:
            layer.enable_adapters(False)
        logger.info("unloaded LoRA %s (--max_loaded_loras %d)", name, self.max_loaded)

    @contextmanager
    def rows(self, sets: list[LoraSet], denoiser: bool = True) -> Iterator[None]:
        """Apply ``sets[i]`` to row i of the calls made inside, each row's adapters in its own order. Rows with the
        same adapters should be next to each other: each run of them is one slice of every LoRA layer's input.
        ``denoiser=False`` around text encoding leaves the denoiser's slots as they are (on CUDA a step may be
        reading them)."""
        plan: list[tuple[int, int | None, LoraSet]] = []
        start = 0
        for index in range(1, len(sets) + 1):
            if index == len(sets) or sets[index] != sets[start]:
                if sets[start]:
                    plan.append((start, None if (start, index) == (0, len(sets)) else index, sets[start]))
                start = index
        self._plan = plan
        slots = self.slots if denoiser else None
        if slots is not None:
            slots.set_rows([[(self._slot_of[name], scale) for name, scale in loras] for loras in sets])
        try:
            yield
        finally:
            self._plan = []
            if slots is not None:
                slots.active = False

    def _add_rows(self, layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """PEFT's LoRA term for each block of rows and each of its adapters, as PEFT's forward adds it after
        ``set_adapters``: ``lora_B(lora_A(x)) * scale * lora_alpha / r`` (sqrt(r) with rslora), summed in order."""
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
                rank = math.sqrt(layer.r[name]) if layer.use_rslora.get(name, False) else layer.r[name]
                scaling = scale * layer.lora_alpha[name] / rank  # PEFT's set_scale
                delta = lora_b(lora_a(layer.lora_dropout[name](part.to(lora_a.weight.dtype)))) * scaling
                block = (block + delta).to(output.dtype)
            if stop is None:
                output = block
            else:
                output[start:stop] = block  # the other rows keep the base layer's output as it is
        return output


class _DoesNotFit(Exception):
    """An adapter that does not fit the model (another family's or architecture's, or a kind not served)."""


def _first_cause(exc: Exception) -> str:
    """One line of a load error: the first shape mismatch of torch's list (another architecture's adapter)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return next((line for line in lines if line.startswith("size mismatch")), lines[0])[:300]
