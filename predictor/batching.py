"""Which jobs run next: the batching policy, in pure Python (no torch, no threads).

- A bounded queue: a request's images enter together or not at all (``QueueFull``).
- Admission: first come, first served within a batch key, while the key holds fewer than ``max_batch_size``
  jobs that are admitted or running. A job therefore waits only for the jobs ahead of it with its own key.
- Batches: keys take turns step by step (round-robin), so no key can starve another.
- An ``AdapterLimit`` (--compile with LoRA adapters: a fixed number of slots) admits a job only while the unfinished
  jobs name no more distinct adapters than there are. A job that must wait for one holds back the
  adapter jobs behind it, so a busy adapter cannot starve it; jobs without adapters go on.
- Deadlines and cancellations are reaped once per engine iteration; ``drain`` empties everything on shutdown.

Only the engine's worker thread changes what the scheduler holds, except ``add``, which any thread may call; so
``add`` and everything that reads or changes the waiting queue run under the engine's lock.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from predictor.jobs import Job, JobState

_HOLDS_SLOT = frozenset({JobState.ADMITTED, JobState.RUNNING})


class QueueFull(Exception):
    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"{waiting} waiting, limit {limit}")
        self.waiting = waiting
        self.limit = limit


@dataclass
class Reaped:
    """Jobs the scheduler let go this iteration (no longer queued or in flight); the engine answers them and
    marks them finished."""

    cancelled: list[Job] = field(default_factory=list)  # the client went away
    expired_waiting: list[Job] = field(default_factory=list)  # deadline passed before they started
    expired_running: list[Job] = field(default_factory=list)  # deadline passed while admitted or running

    def __bool__(self) -> bool:
        return bool(self.cancelled or self.expired_waiting or self.expired_running)


@dataclass(frozen=True)
class AdapterLimit:
    names: Callable[[Job], frozenset[Hashable]]  # the adapters a job needs while it denoises
    capacity: int  # distinct adapters that can be in use at once


class BatchScheduler:
    def __init__(self, max_batch_size: int, max_queue: int, adapter_limit: AdapterLimit | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.adapter_limit = adapter_limit
        self.waiting: collections.deque[Job] = collections.deque()
        self.in_flight: list[Job] = []  # admitted, running or decoding, in admission order
        self._turns: collections.deque[Hashable] = collections.deque()

    # ---- what the engine asks -------------------------------------------------------------------

    def add(self, jobs: Iterable[Job]) -> int:
        """Queue one request's jobs; all or none. Returns how many jobs were waiting ahead of them."""
        jobs = list(jobs)
        ahead = len(self.waiting)
        if ahead + len(jobs) > self.max_queue:
            raise QueueFull(ahead, self.max_queue)
        self.waiting.extend(jobs)
        return ahead

    def reap(self, now: float) -> Reaped:
        """Let go of jobs whose client left, and of jobs past their deadline (except those already decoding:
        their image is as good as made)."""
        reaped = Reaped()
        for job in [*self.waiting, *self.in_flight]:
            if job.cancel_requested():
                reaped.cancelled.append(job)
            elif job.state is JobState.WAITING and job.overdue(now):
                reaped.expired_waiting.append(job)
            elif job.state in _HOLDS_SLOT and job.overdue(now):
                reaped.expired_running.append(job)
        if reaped:
            gone = {id(job) for job in [*reaped.cancelled, *reaped.expired_waiting, *reaped.expired_running]}
            self.waiting = collections.deque(job for job in self.waiting if id(job) not in gone)
            self.in_flight = [job for job in self.in_flight if id(job) not in gone]
            self._prune_turns()
        return reaped

    def admit(self) -> list[Job]:
        """Move waiting jobs into free batch slots, in arrival order within each batch key."""
        slots = collections.Counter(job.batch_key for job in self.in_flight if job.state in _HOLDS_SLOT)
        limit = self.adapter_limit
        # Adapters of every unfinished job, decoding ones too (the runner keeps those until they are answered).
        unfinished = [job for job in self.in_flight if not job.finished]
        in_use: set[Hashable] = {n for job in unfinished for n in limit.names(job)} if limit is not None else set()
        held_back = False  # a job waits for adapter room: adapter jobs behind it wait too
        admitted: list[Job] = []
        kept: collections.deque[Job] = collections.deque()
        for job in self.waiting:
            if slots[job.batch_key] >= self.max_batch_size:
                kept.append(job)
                continue
            if limit is not None and (names := limit.names(job)):
                if held_back or len(in_use | names) > limit.capacity:
                    held_back = True
                    kept.append(job)
                    continue
                in_use |= names
            slots[job.batch_key] += 1
            job.move_to(JobState.ADMITTED)
            admitted.append(job)
            if job.batch_key not in self._turns:
                self._turns.append(job.batch_key)
        self.waiting = kept
        self.in_flight.extend(admitted)
        return admitted

    def next_batch(self) -> list[Job]:
        """The running jobs of the next batch key in turn (empty when nothing is running)."""
        live = {job.batch_key for job in self.in_flight if job.state is JobState.RUNNING}
        for _ in range(len(self._turns)):
            key = self._turns[0]
            self._turns.rotate(-1)
            if key in live:
                return [job for job in self.in_flight if job.batch_key == key and job.state is JobState.RUNNING]
        return []

    def retire(self) -> None:
        """Forget finished jobs, and batch keys that hold no slot any more."""
        self.in_flight = [job for job in self.in_flight if not job.finished]
        self._prune_turns()

    def drain(self) -> list[Job]:
        """Let go of every job not yet finished (shutdown, a failed device); the engine fails them."""
        left = self.unfinished()
        self.waiting.clear()
        self.in_flight.clear()
        self._turns.clear()
        return left

    def _prune_turns(self) -> None:
        live = {job.batch_key for job in self.in_flight if job.state in _HOLDS_SLOT}
        self._turns = collections.deque(key for key in self._turns if key in live)

    # ---- what it holds --------------------------------------------------------------------------

    def running(self) -> list[Job]:
        return [job for job in self.in_flight if job.state is JobState.RUNNING]

    def unfinished(self) -> list[Job]:
        return [job for job in [*self.waiting, *self.in_flight] if not job.finished]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.in_flight)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        """Jobs holding a batch slot (admitted or running)."""
        return sum(1 for job in self.in_flight if job.state in _HOLDS_SLOT)
