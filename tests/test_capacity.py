"""An instance claims only what it can start on time, and commits a run only for a free slot."""

from __future__ import annotations

import pytest

from after.capacity import ON_TIME, Pool

NOW = 1_800_000_000.0  # a task date clock
CLOCK = 500.0  # the run clock (monotonic)


def test_while_no_run_has_ended_there_is_room_for_everything() -> None:
    pool = Pool(slots=1)
    for n in range(1000):
        pool.hold(f"t{n}", NOW)
    assert pool.can_claim(NOW, NOW, CLOCK)
    assert pool.can_commit(ON_TIME, CLOCK)


def test_a_second_of_due_dates_holds_as_many_runs_as_the_pool_starts_in_a_second() -> None:
    pool = Pool(slots=2, average=1.0)  # two runs of a second each: two starts per second
    pool.hold("a", NOW + 60.1)
    assert pool.can_claim(NOW + 60.5, NOW, CLOCK)
    pool.hold("b", NOW + 60.9)
    assert not pool.can_claim(NOW + 60.5, NOW, CLOCK), "that second is full"
    assert pool.can_claim(NOW + 61.0, NOW, CLOCK), "the next second is not"


def test_short_runs_fit_many_per_second() -> None:
    pool = Pool(slots=4, average=0.001)
    for n in range(3999):
        pool.hold(f"t{n}", NOW + 10.5)
    assert pool.can_claim(NOW + 10.5, NOW, CLOCK)
    pool.hold("last", NOW + 10.5)
    assert not pool.can_claim(NOW + 10.5, NOW, CLOCK)


def test_a_long_run_keeps_its_slot_until_it_is_expected_to_end() -> None:
    pool = Pool(slots=1)
    pool.started("long", at=CLOCK - 10)  # has run 10 s: expected to run about 10 s more
    assert not pool.can_claim(NOW + 1, NOW, CLOCK), "due before the slot is free"
    assert pool.can_claim(NOW + 30, NOW, CLOCK), "due after it is expected to end"
    assert not pool.can_commit(ON_TIME, CLOCK)


def test_a_free_slot_takes_a_task_due_now() -> None:
    pool = Pool(slots=2)
    pool.started("long", at=CLOCK - 10)
    assert pool.can_claim(NOW, NOW, CLOCK)
    assert pool.can_commit(ON_TIME, CLOCK)


def test_a_commit_takes_a_slot_until_its_run_starts_or_it_is_undone() -> None:
    pool = Pool(slots=1, average=1.0)
    pool.hold("a", NOW)
    pool.commit("a")
    assert not pool.can_commit(ON_TIME, CLOCK)
    assert not pool.can_claim(NOW, NOW, CLOCK)
    pool.uncommit("a")
    assert pool.can_commit(ON_TIME, CLOCK)
    pool.commit("a")
    pool.started("a", CLOCK)
    assert pool.committing == set()
    assert not pool.can_commit(ON_TIME, CLOCK), "now it runs"
    pool.ended("a", CLOCK + 1.0)
    assert pool.can_commit(ON_TIME, CLOCK + 1.0)


def test_short_runs_let_more_commits_through_than_there_are_slots() -> None:
    pool = Pool(slots=1, average=0.001)  # 250 runs end within a quarter of a second
    for n in range(200):
        pool.commit(f"t{n}")
    assert pool.can_commit(ON_TIME, CLOCK)
    for n in range(200, 260):
        pool.commit(f"t{n}")
    assert not pool.can_commit(ON_TIME, CLOCK)


def test_run_times_are_a_moving_average() -> None:
    pool = Pool(slots=1)
    pool.started("a", 0.0)
    pool.ended("a", 2.0)
    assert pool.average == 2.0
    pool.started("b", 10.0)
    pool.ended("b", 10.0)
    assert pool.average == pytest.approx(1.6)
    pool.ended("never-started", 99.0)
    assert pool.average == pytest.approx(1.6)


def test_a_run_time_leaves_out_the_wait_for_a_thread() -> None:
    """A burst hands hundreds of runs to a few threads at once: the last waits a while,
    yet runs as briefly as the first, and the pool keeps room for the next claims."""
    pool = Pool(slots=4)
    for n in range(400):
        pool.started(f"t{n}", CLOCK)
    for n in range(400):
        began = CLOCK + n * 0.001  # each waited for a thread, then ran a millisecond
        pool.ended(f"t{n}", began + 0.001, began=began)
    assert pool.average == pytest.approx(0.001)
    assert pool.can_claim(NOW, NOW, CLOCK + 0.4)
    pool.started("late", CLOCK)
    pool.ended("late", CLOCK + 2.0)  # without `began`, from the hand-over
    assert pool.average == pytest.approx(0.001 + 0.2 * (2.0 - 0.001))


def test_releasing_is_idempotent_and_empties_the_books() -> None:
    pool = Pool(slots=1, average=1.0)
    pool.hold("a", NOW)
    pool.hold("a", NOW + 5)  # held again at another date: counted once, at the new date
    pool.commit("a")
    assert sum(pool.per_second.values()) == 1
    pool.release("a")
    pool.release("a")
    assert (pool.per_second, pool.held_second, pool.committing) == ({}, {}, set())


def test_a_pool_has_at_least_one_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        Pool(slots=0)
