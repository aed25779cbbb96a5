"""A job: one image of one request, with an explicit state, moving through the engine.

Only the engine's worker thread changes a job's state. A client that leaves cancels the job's ``future``;
that is a request, which the worker applies at its next iteration (the job then becomes ``FINISHED``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from predictor.request import GenerationParams

# Called on the worker thread as (event, current, total[, preview]): ("queued", position, 0), ("step", i, n) and
# ("preview", i, n, a uint8 HxWx3 array).
ProgressCallback = Callable[..., None]


class JobState(enum.Enum):
    WAITING = "waiting"  # queued; holds no batch slot
    ADMITTED = "admitted"  # holds a batch slot; not prepared yet (no latents, no scheduler)
    RUNNING = "running"  # prepared: takes part in the denoising steps of its batch key
    DECODING = "decoding"  # denoised; its decode is under way and it holds no batch slot
    FINISHED = "finished"  # answered, failed or cancelled: the engine forgets it


_NEXT_STATES: dict[JobState, frozenset[JobState]] = {
    JobState.WAITING: frozenset({JobState.ADMITTED, JobState.FINISHED}),
    JobState.ADMITTED: frozenset({JobState.RUNNING, JobState.FINISHED}),
    JobState.RUNNING: frozenset({JobState.DECODING, JobState.FINISHED}),
    JobState.DECODING: frozenset({JobState.FINISHED}),
    JobState.FINISHED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug: the engine moved a job to a state it cannot reach from its current one."""


@dataclass(frozen=True)
class GenerationResult:
    image: Any  # a PIL image
    params: GenerationParams
    prompt_truncated: bool
    nsfw: bool
    seconds: float


@dataclass(eq=False)
class Job:
    params: GenerationParams
    batch_key: Hashable  # jobs with equal keys can share a denoiser call (the runner defines it)
    submitted_at: float
    deadline: float | None = None
    on_progress: ProgressCallback | None = None
    counted: bool = True  # False for the warm-up image: it stays out of the metrics
    future: Future[GenerationResult] = field(default_factory=Future)
    state: JobState = JobState.WAITING
    steps_done: int = 0  # denoiser calls made for this job
    steps_total: int = 0  # denoiser calls its schedule needs; set when prepared
    steps_asked: int = 0  # the steps the request makes (fewer than asked for with an image's strength)
    work: Any = None  # the runner's per-job state (scheduler, latents, conditioning); dropped when finished
    prompt_truncated: bool = False

    def move_to(self, state: JobState) -> None:
        if state not in _NEXT_STATES[self.state]:
            raise IllegalTransition(f"a job cannot go from {self.state.value} to {state.value}")
        self.state = state
        if state is JobState.FINISHED:
            self.work = None  # free its tensors at once, not when the last reference goes

    @property
    def finished(self) -> bool:
        return self.state is JobState.FINISHED

    @property
    def denoised(self) -> bool:
        """All of its denoising steps are done."""
        return self.state is JobState.RUNNING and self.steps_done >= self.steps_total

    def cancel_requested(self) -> bool:
        """The client went away (its future was cancelled) and the engine has not yet let the job go."""
        return self.future.cancelled() and not self.finished

    def overdue(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def preview_due(self, step: int, total: int) -> bool:
        """Whether this step is one of the ``partial_images`` the request asked for: evenly spaced, before the end."""
        wanted = self.params.partial_images
        if wanted <= 0 or step >= total:
            return False
        return step in {round(total * (index + 1) / (wanted + 1)) for index in range(wanted)} - {0}

    def progress(self) -> tuple[int, int]:
        """(step, of steps) as the client asked for them. Some schedules make more denoiser calls than steps
        (PNDM: one more); as in diffusers' progress bar, the extra calls at the start count as no step. An image
        job runs the part of its schedule its strength keeps: those are its steps."""
        asked = self.steps_asked or self.params.num_inference_steps
        extra = max(0, self.steps_total - asked)
        return max(0, self.steps_done - extra), asked
