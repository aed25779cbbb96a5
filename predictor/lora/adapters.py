"""``RowAdapters``: the one LoRA component a runner holds (see the package's docstring for its interface)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from predictor.batching import AdapterLimit
from predictor.device import is_device_error, is_oom
from predictor.errors import GenerationFailed, InvalidRequest, PredictorError
from predictor.lora.layers import DoesNotFit, delete_from, first_cause, read_into
from predictor.lora.library import LoraLibrary, LoraSet
from predictor.lora.residency import Residency
from predictor.lora.rows import PeftHookRows, RowLoRA
from predictor.lora.slots import LayerWeights, SlotRows, take_weights

if TYPE_CHECKING:
    from predictor.jobs import Job
    from predictor.request import GenerationParams

logger = logging.getLogger(__name__)

Encoded = TypeVar("Encoded")


def _adapter_names(job: Job) -> frozenset[Hashable]:
    return frozenset(name for name, _ in job.params.loras)


class RowAdapters:
    """The adapters of ``library`` in ``pipe``, applied row by row (the worker thread's, except ``batch_key`` and
    ``admission_limit``, asked once at start). ``slots`` (--compile) puts the denoiser's adapters in fixed slots
    (``install_for_compile``, before compiling); ``grouped`` (--lora_batching grouped) gives each adapter set its own
    denoiser calls."""

    def __init__(
        self,
        pipe: Any,
        denoiser: torch.nn.Module,
        library: LoraLibrary,
        *,
        max_loaded: int,
        slots: bool = False,
        grouped: bool = False,
    ) -> None:
        self.pipe = pipe
        self.library = library
        self.max_loaded = max_loaded
        self.slots = slots
        self.grouped = grouped
        self._denoiser = denoiser
        text_encoders = [
            module
            for name, module in pipe.components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
        ]
        self._text: RowLoRA = PeftHookRows(text_encoders)  # text encoders: eager whatever the denoiser's strategy
        # The denoiser's strategy, chosen here; SlotRows is made by install_for_compile (it reads every adapter).
        self._denoiser_rows: RowLoRA | None = None if slots else PeftHookRows([denoiser])
        self.residency = Residency(max_loaded, capacity=max_loaded if slots else None)

    @property
    def loaded(self) -> list[str]:
        """The adapters in the model, least recently used first."""
        return self.residency.loaded

    @property
    def slot_bytes(self) -> int:
        """Device memory --compile's slots take (0 without them)."""
        return self._denoiser_rows.bytes if isinstance(self._denoiser_rows, SlotRows) else 0

    # ---- asked once at start -------------------------------------------------------------------------

    def admission_limit(self) -> AdapterLimit | None:
        """With slots the scheduler admits no more distinct adapters at once than there are slots (the other jobs
        wait their turn in the queue); None: no limit."""
        return AdapterLimit(_adapter_names, self.max_loaded) if self.slots else None

    def batch_key(self, params: GenerationParams, family_key: Hashable) -> Hashable:
        """The engine's batch key: the family's, and with --lora_batching grouped the adapters and their scales."""
        return (family_key, params.loras) if self.grouped else family_key

    def install_for_compile(self, max_rows: int) -> None:
        """Before --compile: read every usable adapter of the library once (refusing, with the reason, those that do
        not fit the model), then give each layer any of them changes --max_loaded_loras slots of the largest rank it
        has there. Adapters then load into slots, and the denoiser's modules never change."""
        if not self.slots:
            raise RuntimeError("install_for_compile needs RowAdapters(..., slots=True)")
        started = time.perf_counter()
        ranks: dict[str, int] = {}
        found: dict[str, LayerWeights] = {}

        def survey(name: str) -> int:
            found.clear()
            found.update(take_weights(self._denoiser, name))
            return len(found)

        usable = [entry["name"] for entry in self.library.describe() if entry["available"]]
        for name in usable:
            try:
                self._read(name, survey)
            except OSError as exc:
                self.library.refuse(name, f"could not be read: {exc}")
                continue
            except DoesNotFit as exc:
                self.library.refuse(name, str(exc))
                continue
            finally:
                self._forget(name)
            for layer_name, weights in found.items():
                ranks[layer_name] = max(ranks.get(layer_name, 0), weights.down.shape[0])
        slot_rows = SlotRows(self._denoiser, ranks, self.max_loaded, max_rows)
        self._denoiser_rows = slot_rows
        logger.info(
            "LoRA slots for --compile: %d adapters read in %.1f s; %d layers x %d slots, rank up to %d (%.1f MiB)",
            len(usable),
            time.perf_counter() - started,
            len(ranks),
            self.max_loaded,
            max(ranks.values(), default=0),
            slot_rows.bytes / 2**20,
        )

    def graph_variants(self) -> tuple[AbstractContextManager[None], ...]:
        """The states to warm the compiled denoiser up under, one graph each (with slots: without adapter rows and
        with them)."""
        if self._denoiser_rows is None:
            raise RuntimeError("install_for_compile first")
        return self._denoiser_rows.graph_variants()

    # ---- per batch -----------------------------------------------------------------------------------

    def prepare(self, jobs: Sequence[Job]) -> None:
        """Put the adapters new jobs name into the model (``load``). A job whose adapter could not be loaded raises
        its error (a 400 when it does not fit the model): the engine then prepares the others one by one. The
        adapters of the jobs prepared stay until those jobs are finished."""
        failed = self.load([job.params.loras for job in jobs])
        for job in jobs:
            for name, _ in job.params.loras:
                if name in failed:
                    raise failed[name]
        self.residency.hold(jobs)

    def load(self, sets: Iterable[LoraSet]) -> dict[str, PredictorError]:
        """Load the adapters these sets name that are not in the model yet, then take out the least recently used
        past --max_loaded_loras that no live job names (so the bound is soft: running images keep theirs). With
        slots the bound is hard: an adapter no live job names makes room before a load (the scheduler admits no
        more adapters at once than there are slots). Returns the adapters that could not be loaded, each with its
        error."""
        sets = list(sets)
        busy = self.residency.in_use(sets)
        failed: dict[str, PredictorError] = {}
        for name in dict.fromkeys(name for loras in sets for name, _ in loras):
            if name in self.residency:
                self.residency.used(name)
                continue
            refused = self.library.refusal(name)
            if refused is not None:  # found not to fit while this request waited
                failed[name] = InvalidRequest(f"LoRA '{name}' cannot be used: {refused}", param="loras")
                continue
            if self.residency.full():
                idle = self.residency.idle(busy)
                if idle is None:  # admission keeps this from happening; never overwrite a running image's adapter
                    failed[name] = GenerationFailed(f"no free slot for LoRA '{name}' (--max_loaded_loras)")
                    continue
                self._unload(idle)
            error = self._load(name)
            if error is not None:
                failed[name] = error
        for name in self.residency.surplus(busy):
            self._unload(name)
        return failed

    def encode_grouped(self, jobs: list[Job], encode: Callable[[list[Job]], list[Encoded]]) -> list[Encoded]:
        """``encode(jobs)`` with each job's adapters in the text encoders: one call per adapter set, results in the
        order of ``jobs``. The denoiser's adapters are left as they are (on CUDA a step may be reading them)."""
        if not any(job.params.loras for job in jobs):
            return encode(jobs)
        groups: dict[LoraSet, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.params.loras, []).append(job)
        encoded: dict[Job, Encoded] = {}
        for loras, group in groups.items():
            with self._text.rows([loras]):
                encoded.update(zip(group, encode(group), strict=True))
        return [encoded[job] for job in jobs]

    @staticmethod
    def side_by_side(jobs: Iterable[Job]) -> list[Job]:
        """``jobs`` with equal adapter sets next to each other: each run of them is one slice of every LoRA layer's
        input."""
        return sorted(jobs, key=lambda job: job.params.loras)

    def rows(self, sets: Sequence[LoraSet]) -> AbstractContextManager[None]:
        """Around one denoiser call: row i takes the adapters ``sets[i]`` (diffusers applies a job's adapters to its
        unconditional row too)."""
        if self._denoiser_rows is None:  # slots not made yet: nothing can be loaded either
            return contextlib.nullcontext()
        return self._denoiser_rows.rows(sets)

    # ---- loading and unloading -----------------------------------------------------------------------

    def _read(self, name: str, take_denoiser: Callable[[str], int]) -> None:
        """Load adapter ``name`` with diffusers into the pipeline, then have the denoiser's strategy
        (``take_denoiser``) and the text encoders' take it. Raises OSError (the file), DoesNotFit (the model), or
        the out-of-memory and device errors as they are; the caller takes out what a failed load left behind."""
        directory, file_name = self.library.location(name)
        try:
            read_into(self.pipe, directory, file_name, name)
            changed = take_denoiser(name) + self._text.take(name)
            if not changed:
                raise ValueError("no layer of this model matches its weights (made for another model family?)")
        except Exception as exc:  # diffusers and PEFT raise ValueError, KeyError, RuntimeError (shapes) and more
            if is_oom(exc) or is_device_error(exc):
                raise  # the engine's to handle (halves, restart); the adapter itself may be fine
            raise DoesNotFit(f"it does not fit this model: {first_cause(exc)}") from exc
        logger.debug("read LoRA %s: %d layers", name, changed)

    def _load(self, name: str) -> PredictorError | None:
        denoiser_rows = self._denoiser_rows
        if denoiser_rows is None:
            raise RuntimeError("LoRA slots are made by install_for_compile, before the first load")
        try:
            self._read(name, denoiser_rows.take)
        except OSError as exc:  # the file went or changed: not the adapter's fault, and maybe back later
            self._forget(name)
            logger.error("LoRA %s could not be read: %s", name, exc)
            return GenerationFailed(f"LoRA '{name}' could not be read on the server")
        except DoesNotFit as exc:
            self._forget(name)
            self.library.refuse(name, str(exc))
            return InvalidRequest(f"LoRA '{name}' cannot be used: {exc}", param="loras")
        except BaseException:
            self._forget(name)
            raise
        self.residency.added(name)
        self.library.mark_loaded(name, True)
        slot = denoiser_rows.slot_of(name) if isinstance(denoiser_rows, SlotRows) else None
        logger.info("loaded LoRA %s into %s", name, "the model" if slot is None else f"slot {slot}")
        return None

    def _forget(self, name: str) -> None:
        """Take out whatever a load left behind (all of it after a failure; the text encoders' part after a probe)."""
        with contextlib.suppress(Exception):  # nothing of it was loaded
            delete_from(self.pipe, name)
        self._text.drop(name)
        if self._denoiser_rows is not None:
            self._denoiser_rows.drop(name)
        if self.slots:
            self._denoiser.unload_lora()  # no PEFT layer stays in a denoiser with slots: its compiled modules back

    def _unload(self, name: str) -> None:
        delete_from(self.pipe, name)
        self._text.drop(name)
        if self._denoiser_rows is not None:
            self._denoiser_rows.drop(name)
        self.residency.removed(name)
        self.library.mark_loaded(name, False)
        logger.info("unloaded LoRA %s (--max_loaded_loras %d)", name, self.max_loaded)
