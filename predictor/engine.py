"""The generation engine: one worker thread runs "schedule, run the step, process the output" in a loop.

The batching policy is the batch scheduler's (``batching.py``, no torch), all torch work the runner's
(``runner.py``, which asks the family's module in ``families/`` what differs). This module holds the thread,
submission and shutdown, the one out-of-memory halving helper, the metrics, and the loop's order of operations;
``docs/engine.md`` describes the design and why the loop runs in this order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

from predictor import metrics
from predictor.batching import BatchScheduler, QueueFull, Reaped
from predictor.config import EngineConfig
from predictor.device import is_device_error, is_device_failure, is_oom
from predictor.errors import (
    DeadlineExceeded,
    DeviceFailed,
    GenerationFailed,
    OutOfMemory,
    Overloaded,
    PredictorError,
    ShuttingDown,
    WorkerStopped,
)
from predictor.jobs import GenerationResult, Job, JobState, ProgressCallback
from predictor.loading import LoadedPipeline
from predictor.runner import Decoded, DiffusionRunner, PendingDecode, PendingPreview

logger = logging.getLogger(__name__)

# One step (or decode) running longer than this means the device hangs: liveness fails, the pod restarts.
STALL_S = 120.0
# How long close() waits for the worker to leave its current step before it answers the jobs itself.
_JOIN_S = 5.0

__all__ = ["STALL_S", "EngineConfig", "GenerationEngine", "GenerationResult", "ProgressCallback", "create_engine"]


def create_engine(
    loaded: LoadedPipeline, config: EngineConfig, clock: Callable[[], float] = time.monotonic
) -> GenerationEngine:
    """An engine with the runner of the loaded pipeline's family."""
    return GenerationEngine(DiffusionRunner(loaded, config), config, clock)


class GenerationEngine:
    def __init__(
        self, runner: DiffusionRunner, config: EngineConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.runner = runner
        self.config = config
        self._clock = clock  # for deadlines and image times (tests pass their own)
        self.scheduler = BatchScheduler(config.max_batch_size, config.max_queue, runner.adapter_limit())
        self._metrics = metrics.ModelMetrics(config.model_name)
        self._cond = threading.Condition()  # guards the scheduler, the decode list and the flags below
        self._decodes: list[PendingDecode] = []  # launched, not yet answered, in launch order
        # Previews whose pixels are on their way to the host: (job, step, of steps) each, and the copy.
        self._previews: list[tuple[list[tuple[Job, int, int]], PendingPreview]] = []
        self._accepting = True
        self._stop = False
        self._worker_stopped = False  # the worker thread ended on something other than close()
        self.healthy = True  # False after an unrecoverable device error
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._busy_since: float | None = None  # when the worker started its current iteration (liveness)

    # ---- lifecycle (any thread) ------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker; wait until the runner is warm (with ``compile``, every graph compiled)."""
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def close(self, timeout: float | None = None, join_s: float = _JOIN_S) -> bool:
        """Stop admitting; let admitted and queued work finish (up to ``timeout``); stop the worker, which
        fails what is left with ``shutting_down`` at its next step boundary. A worker still inside a step after
        ``join_s`` (a hung GPU) has its clients answered from here. True if everything finished."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        drained = self.wait_idle(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=join_s)
            if self._thread.is_alive():
                # The worker hangs inside a step: answer its clients from here, the last resort.
                with self._cond:
                    left = self.scheduler.unfinished()
                for job in left:
                    if _settle_future(job.future, ShuttingDown("the server is shutting down")):
                        self._count_failure(job, "shutting_down")
        return drained

    def stop_admitting(self) -> None:
        with self._cond:
            self._accepting = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.scheduler.has_work or self._decodes:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
        return True

    def liveness_failure(self, stall_s: float = STALL_S) -> PredictorError | None:
        """Why this process should be restarted, or None: the worker is gone, the device failed, or one iteration
        has run for ``stall_s`` (a hung GPU)."""
        if self._worker_stopped or self._thread is None or not self._thread.is_alive():
            return WorkerStopped("the generation worker stopped; restart the pod")
        if not self.healthy:
            return DeviceFailed("the GPU failed; restart the pod")
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since >= stall_s:
            return DeviceFailed(f"one generation step has run for over {stall_s:g} s: the GPU hangs; restart the pod")
        return None

    def alive(self, stall_s: float = STALL_S) -> bool:
        return self.liveness_failure(stall_s) is None

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return self.scheduler.queue_depth

    @property
    def active_images(self) -> int:
        with self._cond:
            return self.scheduler.active

    # ---- submission (any thread) -------------------------------------------------------------------

    def submit(
        self,
        params: Iterable[Any],
        on_progress: ProgressCallback | None = None,
        timeout_s: float | None = None,
        counted: bool = True,
    ) -> list[Future[GenerationResult]]:
        """Queue the images of one request together: all are queued, or none (503 overloaded). ``counted``
        False keeps the images out of the metrics (the warm-up)."""
        now = self._clock()
        timeout_s = self.config.request_timeout_s if timeout_s is None else timeout_s
        deadline = now + timeout_s if timeout_s else None
        jobs = [Job(p, self.runner.batch_key(p), now, deadline, on_progress, counted) for p in params]
        with self._cond:
            self._check_admitting()
            try:
                ahead = self.scheduler.add(jobs)
            except QueueFull as full:
                raise _overloaded(full.waiting, full.limit) from None
            self._publish_counts()
            self._cond.notify_all()
        if on_progress is not None:
            on_progress("queued", ahead, 0)
        return [job.future for job in jobs]

    def check_admission(self) -> None:
        """Raise what ``submit`` would for a one-image request now (queue full, shutting down, a failed worker),
        so a request is refused before its input images are decoded; ``submit`` checks again, for its real count."""
        with self._cond:
            self._check_admitting()
            waiting, limit = self.scheduler.queue_depth, self.scheduler.max_queue
        if waiting >= limit:
            raise _overloaded(waiting, limit)

    def _check_admitting(self) -> None:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self._worker_stopped:
            raise WorkerStopped("the generation worker stopped; the server is restarting")
        if not self.healthy:
            raise DeviceFailed("the GPU is in a failed state; the server is restarting")

    def generate(self, params: Any, timeout: float | None = None, counted: bool = True) -> GenerationResult:
        """Blocking helper (warm-up, benchmarks, tests): one image."""
        return self.submit([params], counted=counted)[0].result(timeout=timeout)

    # ---- the worker ----------------------------------------------------------------------------------

    def _run(self) -> None:
        with self.runner.worker_context():
            try:
                self.runner.warm_up()  # on this thread: CUDA graphs belong to the thread that records them
                if self.config.compile:  # from ready on: a later rise is a recompile under requests
                    self._metrics.compiled_graphs.set(self.runner.compiled_graphs())
            except BaseException as exc:
                self._startup_error = exc
                self._worker_stopped = True  # nothing would ever run what is submitted
                return
            finally:
                self._ready.set()
            try:
                while self._iterate():
                    pass
            except BaseException:  # what _iterate does not survive: SystemExit, KeyboardInterrupt, a bug outside a step
                logger.exception("the generation worker stopped")
                with self._cond:
                    self._worker_stopped = True
                self._fail_everything(WorkerStopped("the generation worker stopped; the server is restarting"))
                return
            self._fail_everything(ShuttingDown("the server is shutting down"))

    def _iterate(self) -> bool:
        """One iteration of the loop; False once close() asked the worker to stop."""
        with self._cond:
            while not self._stop and not self.scheduler.has_work and not self._decodes and not self._previews:
                self._cond.wait()
            if self._stop:
                return False
            reaped = self.scheduler.reap(self._clock())
            admitted = self.scheduler.admit()
            self._publish_counts()
        self._answer_reaped(reaped)
        self._busy_since = time.monotonic()
        try:
            self._step(admitted)
        except Exception as exc:  # a device fault or a bug: fail what was in flight, keep serving
            logger.exception("generation step failed")
            self._fail_in_flight(exc)
        finally:
            self._busy_since = None
            with self._cond:
                self.scheduler.retire()
                self._publish_counts()
                self._cond.notify_all()
        return True

    def _step(self, admitted: list[Job]) -> None:
        """Schedule, run the step, process the output, in the order that keeps a GPU fed (docs/engine.md)."""
        launched_before = len(self._decodes)
        if admitted and not self._prepare_behind_step(self.scheduler.running()):
            self._prepare(admitted)
        batch = [job for job in self.scheduler.next_batch() if not job.cancel_requested()]
        if batch:
            self._denoise(batch)
            denoised = [job for job in batch if job.denoised and not job.cancel_requested()]
            if denoised:
                self._start_decode(denoised)
        late = [job for job in admitted if job.state is JobState.ADMITTED and not job.cancel_requested()]
        if late:
            self._prepare(late)
        if self._decodes:
            defer = self._answer_behind_next_step()
            with self._cond:
                due = [d for i, d in enumerate(self._decodes) if i < launched_before or not defer or d.copied is None]
            self._answer(due)
        self._emit_previews()

    # ---- the loop's order: two named predicates ------------------------------------------------------

    def _prepare_behind_step(self, running: list[Job]) -> bool:
        """Prepare new jobs after the running jobs' step is launched, so the GPU runs that step while the host
        encodes prompts and draws latents; the new jobs join the step after. Only where the step leaves the
        host free (CUDA, schedulers that do not synchronise): elsewhere, and on an idle engine, new jobs are
        prepared first and join at once, so a lone request never waits a step."""
        return bool(running) and self.runner.leaves_host_free(job.params for job in running)

    def _answer_behind_next_step(self) -> bool:
        """Answer the decodes launched in this iteration in the next one, after its step is launched, so the
        GPU runs that step while the host turns pixels into pictures: when jobs are still running (unless a
        safety checker would wait for the GPU anyway), or when waiting jobs will start a step that leaves the
        host free."""
        with self._cond:
            if self.scheduler.active:
                return not self.runner.has_safety_checker
            waiting = [job.params for job in self.scheduler.waiting]
        return bool(waiting) and self.runner.leaves_host_free(waiting)

    # ---- running the runner ------------------------------------------------------------------------

    def _halve_on_oom(self, batch: Any, run: Callable[[Any], None]) -> None:
        """``run(batch)``; after an out-of-memory error, free the cache and retry in halves, down to single jobs;
        a job that does not fit alone fails with ``out_of_memory`` and the rest go on. ``batch`` is a list of jobs
        or a ``PendingDecode`` (both slice); ``run`` must change no job state before it can fail."""
        try:
            run(batch)
        except Exception as exc:
            if not is_oom(exc):
                raise
            self.runner.free_cached_memory()
            jobs = batch.jobs if isinstance(batch, PendingDecode) else batch
            if len(jobs) == 1:
                logger.warning("out of memory for a single %dx%d image", jobs[0].params.width, jobs[0].params.height)
                self._fail(jobs[0], OutOfMemory("this image does not fit in GPU memory; ask for a smaller size"))
                return
            half = len(jobs) // 2
            logger.warning("out of memory with %d images in one call; retrying in halves", len(jobs))
            self._halve_on_oom(batch[:half], run)
            self._halve_on_oom(batch[half:], run)

    def _prepare(self, jobs: list[Job]) -> None:
        """Prepare new jobs together (they start running); on out-of-memory in halves."""
        self._halve_on_oom(jobs, self._prepare_or_fail)

    def _prepare_or_fail(self, jobs: Sequence[Job]) -> None:
        """If preparing fails for another reason than memory or the device, retry one by one, so only the job at
        fault fails."""
        jobs = [job for job in jobs if job.state is JobState.ADMITTED]  # a retry skips those already prepared
        if not jobs:
            return
        try:
            self.runner.prepare(jobs)
        except Exception as exc:
            if is_oom(exc) or is_device_error(exc):
                raise
            for job in jobs:
                self._prepare_alone(job)
            return
        for job in jobs:
            job.move_to(JobState.RUNNING)

    def _prepare_alone(self, job: Job) -> None:
        try:
            self.runner.prepare([job])
        except PredictorError as exc:  # the request's own fault (a LoRA that does not fit the model): its 4xx
            logger.warning("could not start a generation: %s", exc.message)
            self._fail(job, exc)
            return
        except Exception as exc:
            if is_oom(exc) or is_device_error(exc):
                raise
            logger.exception("could not start a generation")
            self._fail(job, GenerationFailed("the generation could not start"))
            return
        job.move_to(JobState.RUNNING)

    def _denoise(self, batch: list[Job]) -> None:
        """One denoiser call over the batch (retried in halves on out-of-memory: it changes no job state), then
        each job's own scheduler step."""
        started = time.perf_counter()
        predictions: dict[Job, Any] = {}
        self._halve_on_oom(batch, lambda part: predictions.update(self.runner.predict_noise(list(part))))
        for job in batch:
            if job in predictions and not job.finished and not job.cancel_requested():
                try:
                    self.runner.advance(job, predictions[job])
                except Exception as exc:
                    if is_oom(exc) or is_device_error(exc):
                        raise
                    name, step = job.params.scheduler, job.steps_done
                    logger.exception("scheduler %s failed at step %d", name, step)
                    self._fail(job, GenerationFailed(f"the {name} scheduler failed at step {step}"))
        if any(job.counted for job in batch):  # not the warm-up's steps
            self._metrics.batch_size.observe(len(predictions))
            self._metrics.step_seconds.observe(time.perf_counter() - started)
        if self.config.compile:
            self._metrics.compiled_graphs.set(self.runner.compiled_graphs())
        previews: list[Job] = []
        for job in batch:
            if job.on_progress is not None and not job.finished and not job.cancel_requested():
                step, total = job.progress()
                if step > 0:
                    _notify(job, "step", step, total)
                if job.preview_due(step, total):
                    previews.append(job)
        if previews:
            self._send_previews(previews)

    def _send_previews(self, jobs: list[Job]) -> None:
        """Queue partial images for the jobs that asked for one at this step: the runner's cheap preview (a
        latent-to-RGB map, or the tiny VAE of --preview_vae_dir; never the model's own VAE), copied to the host
        behind the step, sent once the copy is done (``_emit_previews``). A failure costs the preview, not the
        image."""
        try:
            pending = self.runner.start_preview(jobs)
        except Exception:
            logger.exception("preview failed; the images go on without it")
            return
        with self._cond:
            self._previews.append(([(job, *job.progress()) for job in jobs], pending))

    def _emit_previews(self) -> None:
        """Send the previews whose copies are done; on CUDA the ones still copying wait for the next iteration
        (whose step is then already queued), unless nothing else runs."""
        if not self._previews:
            return
        idle = not self.scheduler.running()
        while self._previews:
            shown, pending = self._previews[0]
            if not (idle or pending.ready()):
                return
            self._previews.pop(0)
            try:
                pictures = self.runner.finish_preview(pending)
            except Exception:
                logger.exception("preview failed; the images go on without it")
                continue
            for (job, step, total), picture in zip(shown, pictures, strict=True):
                if not job.finished and not job.cancel_requested():
                    _notify(job, "preview", step, total, picture)

    def _start_decode(self, jobs: list[Job]) -> None:
        def launch(part: Sequence[Job]) -> None:
            decode = self.runner.start_decode(list(part))
            with self._cond:
                for job in part:
                    job.move_to(JobState.DECODING)
                self._decodes.append(decode)

        self._halve_on_oom(jobs, launch)

    def _answer(self, decodes: list[PendingDecode]) -> None:
        """Answer decoded images. A decode stays listed until it is answered, so wait_idle and close see its jobs;
        only an unrecoverable device error leaves it there (and propagates)."""
        for decode in decodes:
            self._halve_on_oom(decode, self._answer_or_fail)
            with self._cond:
                if decode in self._decodes:
                    self._decodes.remove(decode)
                self._cond.notify_all()

    def _answer_or_fail(self, decode: PendingDecode) -> None:
        """Answer a decode (or a part of one); a failure other than memory or the device fails its images only."""
        try:
            self._answer_part(decode)
        except Exception as exc:
            if is_oom(exc) or is_device_failure(exc):
                raise
            logger.exception("could not finish %d images", len(decode))
            for job in decode.jobs:
                self._fail(job, GenerationFailed("the image could not be made"))

    def _answer_part(self, decode: PendingDecode) -> None:
        outcomes = self.runner.finish_decode(decode)
        now = self._clock()
        for job, outcome in zip(decode.jobs, outcomes, strict=True):
            if job.finished:  # the client left while its image was being finished
                continue
            if isinstance(outcome, Decoded):
                seconds = now - job.submitted_at
                result = GenerationResult(outcome.image, job.params, job.prompt_truncated, outcome.nsfw, seconds)
                self._resolve(job, result)
            else:
                self._fail(job, outcome)

    # ---- answering jobs ------------------------------------------------------------------------------

    def _answer_reaped(self, reaped: Reaped) -> None:
        for job in reaped.cancelled:
            job.move_to(JobState.FINISHED)
            self._count_failure(job, "cancelled")
        for job in reaped.expired_waiting:
            self._fail(job, DeadlineExceeded(f"the request waited longer than {_timeout_text(job)}"))
        for job in reaped.expired_running:
            self._fail(job, DeadlineExceeded(f"the request did not finish within {_timeout_text(job)}"))

    # A job is answered once: resolving or failing a finished job does nothing (it was answered and counted).

    def _resolve(self, job: Job, result: GenerationResult) -> None:
        if job.finished:
            return
        job.move_to(JobState.FINISHED)
        try:
            job.future.set_result(result)
        except InvalidStateError:  # the client left meanwhile, or close() answered it
            if job.future.cancelled():
                self._count_failure(job, "cancelled")
            return
        if job.counted:
            self._metrics.images.inc()
            self._metrics.image_seconds.observe(result.seconds)

    def _fail(self, job: Job, error: PredictorError) -> None:
        if job.finished:
            return
        job.move_to(JobState.FINISHED)
        if _settle_future(job.future, error):
            self._count_failure(job, error.error_type)
        elif job.future.cancelled():
            self._count_failure(job, "cancelled")

    def _count_failure(self, job: Job, error_type: str) -> None:
        if job.counted:
            self._metrics.failures(error_type).inc()

    def _fail_in_flight(self, exc: Exception) -> None:
        """Fail the jobs in flight after ``exc``. Images already decoded are still answered unless the device
        itself failed; then the queued jobs fail too, and liveness fails so the pod restarts."""
        device_failed = is_device_failure(exc)
        if not device_failed and self._decodes:
            try:
                self._answer(list(self._decodes))
            except Exception:
                logger.exception("could not answer the images decoded before the failure")
        message = "image generation failed on the server"
        if device_failed:
            self.healthy = False
            message = "the GPU failed; the server is restarting"
        with self._cond:
            in_flight = [job for job in self.scheduler.in_flight if not job.finished]
            self._decodes.clear()
        for job in in_flight:
            self._fail(job, GenerationFailed(message))
        if device_failed:
            with self._cond:
                waiting = self.scheduler.drain()
            for job in waiting:
                self._fail(job, DeviceFailed("the GPU is in a failed state; the server is restarting"))

    def _fail_everything(self, error: PredictorError) -> None:
        with self._cond:
            left = self.scheduler.drain()
            self._decodes.clear()
            self._publish_counts()
            self._cond.notify_all()
        for job in left:
            self._fail(job, error)

    def _publish_counts(self) -> None:
        self._metrics.queue_depth.set(self.scheduler.queue_depth)
        self._metrics.active_images.set(self.scheduler.active)


def _overloaded(waiting: int, limit: int) -> Overloaded:
    return Overloaded(
        f"too many queued images ({waiting} waiting, limit {limit}); retry later", headers={"Retry-After": "1"}
    )


def _notify(job: Job, *event: Any) -> None:
    """A job's progress callback; one that raises (a closed event loop at shutdown) costs that job's events only."""
    try:
        if job.on_progress is not None:
            job.on_progress(*event)
    except Exception:
        logger.exception("a progress callback failed; the generation goes on")


def _timeout_text(job: Job) -> str:
    """The job's own time limit (only jobs with a deadline expire), as the flag that sets it by default."""
    return f"{job.deadline - job.submitted_at:g} s (--request_timeout_s)"


def _settle_future(future: Future[GenerationResult], error: PredictorError) -> bool:
    """Fail ``future`` unless it is already settled (answered, failed, or cancelled by its client)."""
    try:
        future.set_exception(error)
        return True
    except InvalidStateError:
        return False
