"""The batching policy alone: pure Python, no model, no threads, no clock (time is a number passed in)."""

from __future__ import annotations

import pytest

from predictor.batching import AdapterLimit, BatchScheduler, QueueFull
from predictor.jobs import IllegalTransition, Job, JobState
from predictor.testing import params

SMALL, LARGE = (64, 64), (128, 128)


def job(name: str = "job", key=SMALL, deadline: float | None = None, steps: int = 3) -> Job:
    return Job(params(prompt=name, num_inference_steps=steps), key, submitted_at=0.0, deadline=deadline)


def start(scheduler: BatchScheduler) -> list[Job]:
    """Admit, and mark the admitted jobs prepared (what the engine does after the runner prepares them)."""
    admitted = scheduler.admit()
    for each in admitted:
        each.steps_total = each.params.num_inference_steps
        each.move_to(JobState.RUNNING)
    return admitted


def names(jobs: list[Job]) -> list[str]:
    return [each.params.prompt for each in jobs]


def test_queue_bound_takes_a_request_whole_or_not_at_all() -> None:
    scheduler = BatchScheduler(max_batch_size=2, max_queue=4)
    assert scheduler.add([job("a"), job("b"), job("c")]) == 0
    with pytest.raises(QueueFull) as full:
        scheduler.add([job("d"), job("e")])
    assert (full.value.waiting, full.value.limit) == (3, 4)
    assert names(list(scheduler.waiting)) == ["a", "b", "c"], "a refused request leaves nothing behind"
    assert scheduler.add([job("d")]) == 3  # three ahead of it
    assert scheduler.queue_depth == 4


def test_admission_is_first_come_first_served_up_to_the_batch_size_per_key() -> None:
    scheduler = BatchScheduler(max_batch_size=2, max_queue=10)
    scheduler.add([job("s1"), job("s2"), job("s3"), job("l1", LARGE), job("s4")])
    admitted = start(scheduler)
    # Two slots per key: s3 and s4 wait for a small slot; the large job is not held up by them.
    assert names(admitted) == ["s1", "s2", "l1"]
    assert names(list(scheduler.waiting)) == ["s3", "s4"]
    assert scheduler.active == 3
    assert start(scheduler) == [], "no slot freed, nobody admitted"
    admitted[0].move_to(JobState.FINISHED)
    scheduler.retire()
    assert names(start(scheduler)) == ["s3"], "the next in arrival order takes the freed slot"


def test_adapter_slots_admit_no_more_adapters_than_they_hold_and_starve_nobody() -> None:
    """Two slots (--compile): a job whose adapter finds no slot waits, and adapter jobs behind it wait too, even
    for an adapter in use (else a busy adapter could keep it out for ever); jobs without adapters go on."""
    adapters = {"a1": "a", "b1": "b", "c1": "c", "plain": "", "a2": "a", "a3": "a"}

    def needs(each: Job) -> frozenset:
        return frozenset(filter(None, [adapters[each.params.prompt]]))

    scheduler = BatchScheduler(max_batch_size=8, max_queue=10, adapter_limit=AdapterLimit(needs, capacity=2))
    scheduler.add([job("a1"), job("b1"), job("c1"), job("plain"), job("a2")])
    a1, b1, plain = start(scheduler)
    assert names([a1, b1, plain]) == ["a1", "b1", "plain"]
    assert names(list(scheduler.waiting)) == ["c1", "a2"], "a2 waits behind c1 though a is in use"
    a1.move_to(JobState.DECODING)  # its last step may still be reading its slot: a stays in use until answered
    assert start(scheduler) == []
    a1.move_to(JobState.FINISHED)
    scheduler.retire()
    scheduler.add([job("a3")])
    assert names(start(scheduler)) == ["c1"], "b and c now: the a jobs wait for a slot"
    b1.move_to(JobState.FINISHED)
    scheduler.retire()
    assert names(start(scheduler)) == ["a2", "a3"]


def test_decoding_jobs_free_their_batch_slot() -> None:
    scheduler = BatchScheduler(max_batch_size=1, max_queue=10)
    scheduler.add([job("first"), job("second")])
    (first,) = start(scheduler)
    first.move_to(JobState.DECODING)
    assert names(start(scheduler)) == ["second"]
    assert scheduler.has_work and len(scheduler.in_flight) == 2  # the decoding job is still in flight


def test_keys_take_turns_step_by_step() -> None:
    scheduler = BatchScheduler(max_batch_size=4, max_queue=10)
    scheduler.add([job("s1"), job("l1", LARGE), job("s2")])
    start(scheduler)
    batches = [names(scheduler.next_batch()) for _ in range(4)]
    assert batches == [["s1", "s2"], ["l1"], ["s1", "s2"], ["l1"]]


def test_a_key_with_nothing_running_is_skipped() -> None:
    scheduler = BatchScheduler(max_batch_size=4, max_queue=10)
    scheduler.add([job("s1")])
    start(scheduler)
    scheduler.add([job("l1", LARGE)])
    scheduler.admit()  # admitted but not prepared: it cannot run yet
    assert [names(scheduler.next_batch()) for _ in range(3)] == [["s1"]] * 3
    assert names(scheduler.running()) == ["s1"]
    assert scheduler.next_batch() != [] and BatchScheduler(1, 1).next_batch() == []


def test_retire_forgets_finished_jobs_and_idle_keys() -> None:
    scheduler = BatchScheduler(max_batch_size=4, max_queue=10)
    scheduler.add([job("s1"), job("l1", LARGE)])
    small, large = start(scheduler)
    large.move_to(JobState.FINISHED)
    scheduler.retire()
    assert scheduler.in_flight == [small]
    assert [names(scheduler.next_batch()) for _ in range(2)] == [["s1"], ["s1"]]
    small.move_to(JobState.DECODING)
    small.move_to(JobState.FINISHED)
    scheduler.retire()
    assert not scheduler.has_work


def test_cancelled_jobs_are_reaped_in_every_state() -> None:
    scheduler = BatchScheduler(max_batch_size=1, max_queue=10)
    decoding, running, queued, kept = job("decoding"), job("running"), job("queued"), job("kept")
    scheduler.add([decoding, running, queued, kept])
    start(scheduler)  # max_batch_size 1: only the first is admitted
    decoding.move_to(JobState.DECODING)  # which frees its slot for the next
    start(scheduler)
    assert (decoding.state, running.state, queued.state) == (JobState.DECODING, JobState.RUNNING, JobState.WAITING)
    for each in (decoding, running, queued):
        assert each.future.cancel()
    reaped = scheduler.reap(now=0.0)
    assert names(reaped.cancelled) == ["queued", "decoding", "running"]
    assert names(list(scheduler.waiting)) == ["kept"]
    assert scheduler.in_flight == [], "let go of: the engine answers them"
    assert not scheduler.reap(now=0.0), "a job is reaped once"
    assert names(scheduler.admit()) == ["kept"], "the slots are free again"


def test_deadlines_expire_waiting_and_running_jobs_but_not_decoding_ones() -> None:
    scheduler = BatchScheduler(max_batch_size=2, max_queue=10)
    running, decoding = job("running", deadline=5.0), job("decoding", deadline=5.0)
    queued, patient = job("queued", deadline=5.0), job("patient", deadline=50.0)
    scheduler.add([running, decoding, queued, patient])
    start(scheduler)
    decoding.move_to(JobState.DECODING)
    assert not scheduler.reap(now=5.0), "the deadline itself is not past it"
    reaped = scheduler.reap(now=6.0)
    assert names(reaped.expired_running) == ["running"]
    assert names(reaped.expired_waiting) == ["queued"]
    assert reaped.cancelled == []
    assert decoding in scheduler.in_flight, "an image being decoded is as good as made"
    assert names(start(scheduler)) == ["patient"], "the expired job's slot is free again"


def test_drain_lets_go_of_everything_unfinished() -> None:
    scheduler = BatchScheduler(max_batch_size=1, max_queue=10)
    scheduler.add([job("a"), job("b"), job("c")])
    start(scheduler)
    left = scheduler.drain()
    assert names(left) == ["b", "c", "a"]
    assert not scheduler.has_work and scheduler.next_batch() == []


def test_job_states_move_only_forward() -> None:
    each = job()
    with pytest.raises(IllegalTransition):
        each.move_to(JobState.RUNNING)  # not admitted yet
    each.move_to(JobState.ADMITTED)
    each.move_to(JobState.RUNNING)
    each.work = object()
    each.move_to(JobState.FINISHED)
    assert each.work is None, "a finished job lets go of its tensors"
    with pytest.raises(IllegalTransition):
        each.move_to(JobState.WAITING)


def test_progress_counts_the_steps_asked_for_not_extra_scheduler_calls() -> None:
    each = job(steps=25)
    each.steps_total = 26  # PNDM makes one call more than the steps asked for
    each.steps_done = 1
    assert each.progress() == (0, 25)
    each.steps_done = 26
    assert each.progress() == (25, 25)
    plain = job(steps=4)
    plain.steps_total, plain.steps_done = 4, 1
    assert plain.progress() == (1, 4)
