"""Which adapters are in the model, and which of them may go: least recently used first, never one a live job needs.

Pure Python (no torch), the worker thread's. A job's adapters are in use from its preparation until it is
finished: answered, failed or cancelled. A decoding job counts: on CUDA its last step may still be reading its
adapter (a slot's weights under --compile) while the next jobs are prepared on the other stream, so its adapter
stays until its images are answered. The scheduler's ``AdapterLimit`` counts the same jobs, so with slots a job is
admitted only when the adapters it brings fit beside those.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from predictor.lora.library import LoraSet

if TYPE_CHECKING:
    from predictor.jobs import Job


class Residency:
    """The loaded adapters in order of use, and the jobs holding them. ``max_loaded`` is a soft bound (adapters
    past it go once no live job names them); ``capacity``, when set (slots), a hard one."""

    def __init__(self, max_loaded: int, capacity: int | None = None) -> None:
        self.max_loaded = max_loaded
        self.capacity = capacity
        self._order: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._holders: weakref.WeakSet[Job] = weakref.WeakSet()  # prepared jobs that name adapters

    @property
    def loaded(self) -> list[str]:
        return list(self._order)

    def __contains__(self, name: str) -> bool:
        return name in self._order

    def used(self, name: str) -> None:
        self._order.move_to_end(name)

    def added(self, name: str) -> None:
        self._order[name] = None

    def removed(self, name: str) -> None:
        del self._order[name]

    def hold(self, jobs: Iterable[Job]) -> None:
        """Jobs just prepared: their adapters stay until each is finished."""
        self._holders.update(job for job in jobs if job.params.loras)

    def in_use(self, wanted: Iterable[LoraSet] = ()) -> set[str]:
        """The adapters unfinished jobs hold, and those ``wanted`` now."""
        sets = [job.params.loras for job in self._holders if not job.finished]
        return {name for loras in [*sets, *wanted] for name, _ in loras}

    def full(self) -> bool:
        """Whether another adapter needs one to go first (a hard bound, reached)."""
        return self.capacity is not None and len(self._order) >= self.capacity

    def idle(self, busy: set[str]) -> str | None:
        """The least recently used adapter not in ``busy``; None when every one is."""
        return next((name for name in self._order if name not in busy), None)

    def surplus(self, busy: set[str]) -> list[str]:
        """Adapters to take out to come back to ``max_loaded``, least recently used first, none of ``busy``."""
        over = len(self._order) - self.max_loaded
        idle = [name for name in self._order if name not in busy]
        return idle[: max(over, 0)]
