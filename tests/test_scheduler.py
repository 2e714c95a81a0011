"""The in-memory Scheduler: what runs, when, in which order, and what never runs.

No server is needed. Waits go through threading.Event with timeouts; the only
deliberate waits are the short ones proving that something does *not* happen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import pytest

from after.scheduler import Scheduler, wait_until

pytestmark = pytest.mark.timeout(30)

WAIT = 5.0  # upper bound for anything expected to happen; never reached when all is well
TOLERANCE = 0.05  # how late a callback may fire on an idle machine


def at(seconds: float) -> datetime:
    """An aware UTC datetime `seconds` from now."""
    return datetime.now(UTC) + timedelta(seconds=seconds)


class Recorder:
    """Collects (key, time.time()) from callbacks; lets a test wait for a number of calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Hashable, float]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def callback(self, key: Hashable) -> Callable[[], None]:
        def fire() -> None:
            now = time.time()
            with self._changed:
                self.calls.append((key, now))
                self._changed.notify_all()

        return fire

    def wait_for(self, count: int, timeout: float = WAIT) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.calls) >= count, timeout)

    @property
    def keys(self) -> list[Hashable]:
        with self._lock:
            return [key for key, _ in self.calls]

    def time_of(self, key: Hashable) -> float:
        with self._lock:
            return next(t for k, t in self.calls if k == key)


@pytest.fixture
def scheduler() -> Iterator[Scheduler]:
    with Scheduler() as s:
        yield s


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def fire_and_wait(s: Scheduler, when: datetime) -> None:
    """Schedule a sentinel at `when` and wait for it: everything due before it has run by then."""
    done = threading.Event()
    s.schedule(when, done.set)
    assert done.wait(WAIT), "the sentinel never fired"


# -- ordering ----------------------------------------------------------------


def test_entries_scheduled_out_of_order_fire_in_time_order(
    scheduler: Scheduler, recorder: Recorder
) -> None:
    base = at(0.1)
    for offset in (0.08, 0.0, 0.12, 0.04):
        scheduler.schedule(base + timedelta(seconds=offset), recorder.callback(offset))

    assert recorder.wait_for(4)
    assert recorder.keys == [0.0, 0.04, 0.08, 0.12]


def test_entries_due_at_the_same_moment_fire_in_insertion_order(
    scheduler: Scheduler, recorder: Recorder
) -> None:
    # Keys of mixed, mutually unorderable types: ties must never compare keys.
    keys: list[Hashable] = ["b", 3, ("t",), "a", frozenset({1}), 1.5]
    when = at(0.1)
    for key in keys:
        scheduler.schedule(when, recorder.callback(key), key=key)

    assert recorder.wait_for(len(keys))
    assert recorder.keys == keys


def test_overdue_entries_fire_at_once_oldest_first(recorder: Recorder) -> None:
    s = Scheduler()
    now = datetime.now(UTC)
    s.schedule(now - timedelta(seconds=1), recorder.callback("1 s late"))
    s.schedule(now - timedelta(hours=1), recorder.callback("1 h late"))
    s.schedule(now - timedelta(minutes=1), recorder.callback("1 min late"))
    assert recorder.calls == [], "nothing runs before start()"

    started = time.time()
    with s:
        assert recorder.wait_for(3)

    assert recorder.keys == ["1 h late", "1 min late", "1 s late"]
    assert recorder.time_of("1 s late") - started < TOLERANCE


def test_pending_lists_entries_in_firing_order() -> None:
    s = Scheduler()  # never started: nothing fires
    later, sooner = at(60), at(30)
    s.schedule(later, lambda: None, key="later")
    s.schedule(sooner, lambda: None, key="sooner")
    s.schedule(later, lambda: None, key="later too")

    assert s.pending() == [(sooner, "sooner"), (later, "later"), (later, "later too")]
    assert len(s) == 3
    assert s.when("sooner") == sooner
    assert s.when("unknown") is None


# -- keys, cancel, reschedule, replace -----------------------------------------


def test_schedule_without_a_key_returns_a_new_unique_key() -> None:
    s = Scheduler()
    first = s.schedule(at(60), lambda: None)
    second = s.schedule(at(60), lambda: None)

    assert first != second
    assert first in s and second in s
    assert len(s) == 2


def test_a_cancelled_entry_never_fires(scheduler: Scheduler, recorder: Recorder) -> None:
    scheduler.schedule(at(0.05), recorder.callback("cancelled"), key="cancelled")
    scheduler.schedule(at(0.06), recorder.callback("kept"), key="kept")

    assert scheduler.cancel("cancelled") is True
    assert "cancelled" not in scheduler
    assert scheduler.when("cancelled") is None

    assert recorder.wait_for(1)
    fire_and_wait(scheduler, at(0.1))
    assert recorder.keys == ["kept"]


def test_cancel_returns_false_unless_the_entry_was_pending(
    scheduler: Scheduler, recorder: Recorder
) -> None:
    assert scheduler.cancel("never scheduled") is False

    scheduler.schedule(at(0), recorder.callback("done"), key="done")
    assert recorder.wait_for(1)
    assert scheduler.cancel("done") is False, "an entry that already fired is not pending"

    scheduler.schedule(at(60), lambda: None, key="twice")
    assert scheduler.cancel("twice") is True
    assert scheduler.cancel("twice") is False


def test_reschedule_later_delays_the_entry(scheduler: Scheduler, recorder: Recorder) -> None:
    scheduler.schedule(at(0.05), recorder.callback("moved"), key="moved")
    new_time = at(0.2)

    assert scheduler.reschedule("moved", new_time) is True
    assert scheduler.when("moved") == new_time

    assert recorder.wait_for(1)
    assert recorder.time_of("moved") >= new_time.timestamp()


def test_reschedule_earlier_than_the_head_wakes_the_timer_thread(
    scheduler: Scheduler, recorder: Recorder
) -> None:
    # The thread is asleep until the first entry (up to its 30 s cap); moving the
    # other one ahead of it must wake it rather than wait out that sleep.
    scheduler.schedule(at(20), recorder.callback("head"), key="head")
    scheduler.schedule(at(40), recorder.callback("moved"), key="moved")
    time.sleep(0.05)  # let the thread settle into its long wait
    new_time = at(0.1)

    assert scheduler.reschedule("moved", new_time) is True

    assert recorder.wait_for(1, timeout=2)
    assert recorder.keys == ["moved"]
    assert new_time.timestamp() <= recorder.time_of("moved") < new_time.timestamp() + TOLERANCE
    assert scheduler.pending() == [(scheduler.when("head"), "head")]


def test_an_earlier_new_entry_is_honoured_at_once(scheduler: Scheduler, recorder: Recorder) -> None:
    scheduler.schedule(at(20), recorder.callback("far"), key="far")
    time.sleep(0.05)  # let the thread settle into its long wait
    near = at(0.1)
    scheduler.schedule(near, recorder.callback("near"))

    assert recorder.wait_for(1, timeout=2)
    assert recorder.keys == ["near"]
    assert recorder.time_of("near") < near.timestamp() + TOLERANCE


def test_reschedule_returns_false_for_an_unknown_key(scheduler: Scheduler) -> None:
    assert scheduler.reschedule("unknown", at(1)) is False
    assert "unknown" not in scheduler


def test_scheduling_an_existing_key_replaces_the_entry(
    scheduler: Scheduler, recorder: Recorder
) -> None:
    scheduler.schedule(at(0.05), recorder.callback("first"), key="job")
    replacement_time = at(0.15)
    assert scheduler.schedule(replacement_time, recorder.callback("second"), key="job") == "job"

    assert len(scheduler) == 1
    assert scheduler.when("job") == replacement_time

    assert recorder.wait_for(1)
    fire_and_wait(scheduler, at(0.05))
    assert recorder.keys == ["second"]
    assert recorder.time_of("second") >= replacement_time.timestamp()


# -- timing ------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3])
def test_fires_no_earlier_than_its_time_and_soon_after(
    scheduler: Scheduler, recorder: Recorder, delay: float
) -> None:
    when = at(delay)
    scheduler.schedule(when, recorder.callback("timed"))

    assert recorder.wait_for(1)
    fired = recorder.time_of("timed")
    assert when.timestamp() <= fired < when.timestamp() + TOLERANCE


def test_any_timezone_means_the_same_instant(scheduler: Scheduler, recorder: Recorder) -> None:
    when = at(0.1).astimezone(timezone(timedelta(hours=-7)))
    scheduler.schedule(when, recorder.callback("elsewhere"))

    assert recorder.wait_for(1)
    assert when.timestamp() <= recorder.time_of("elsewhere") < when.timestamp() + TOLERANCE


@pytest.fixture
def local_time_is_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the local zone UTC+5, so that reading a naive datetime as local time would show."""
    monkeypatch.setenv("TZ", "XXX-5")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset")
@pytest.mark.usefixtures("local_time_is_not_utc")
def test_a_naive_datetime_is_taken_as_utc(scheduler: Scheduler, recorder: Recorder) -> None:
    assert datetime.now().astimezone().utcoffset() == timedelta(hours=5)
    naive = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=0.1)

    key = scheduler.schedule(naive, recorder.callback("naive"))

    assert scheduler.when(key) == naive.replace(tzinfo=UTC)
    assert recorder.wait_for(1, timeout=2)
    expected = naive.replace(tzinfo=UTC).timestamp()
    assert expected <= recorder.time_of("naive") < expected + TOLERANCE


# -- callbacks -----------------------------------------------------------------


def test_a_failing_callback_is_logged_and_later_ones_still_fire(
    scheduler: Scheduler, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="after.scheduler"):
        scheduler.schedule(at(0.05), boom, key="boom")
        scheduler.schedule(at(0.1), recorder.callback("after"))
        assert recorder.wait_for(1)

    assert recorder.keys == ["after"]
    assert scheduler.running
    failures = [r for r in caplog.records if r.name == "after.scheduler"]
    assert len(failures) == 1
    assert "'boom'" in failures[0].getMessage()
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is RuntimeError


def test_callbacks_run_on_the_timer_thread_without_an_executor(scheduler: Scheduler) -> None:
    threads: list[threading.Thread] = []
    done = threading.Event()

    def record() -> None:
        threads.append(threading.current_thread())
        done.set()

    scheduler.schedule(at(0), record)

    assert done.wait(WAIT)
    assert threads[0] is not threading.main_thread()
    assert threads[0].name == "after-scheduler"
    assert threads[0].daemon


def test_callbacks_can_use_the_scheduler(scheduler: Scheduler, recorder: Recorder) -> None:
    seen: dict[str, object] = {}
    done = threading.Event()

    def chained() -> None:
        done.set()

    def first() -> None:
        seen["self pending"] = "first" in scheduler
        seen["victim cancelled"] = scheduler.cancel("victim")
        seen["moved"] = scheduler.reschedule("moved", at(0))
        scheduler.schedule(at(0.05), chained, key="chained")
        seen["pending"] = [key for _, key in scheduler.pending()]

    scheduler.schedule(at(0.05), first, key="first")
    scheduler.schedule(at(0.1), recorder.callback("victim"), key="victim")
    scheduler.schedule(at(30), recorder.callback("moved"), key="moved")

    assert done.wait(WAIT), "an entry scheduled from a callback never fired"
    assert recorder.wait_for(1)
    assert seen == {
        "self pending": False,  # a firing entry is no longer pending
        "victim cancelled": True,
        "moved": True,
        "pending": ["moved", "chained"],
    }
    fire_and_wait(scheduler, at(0.05))
    assert recorder.keys == ["moved"]


def test_a_callback_can_stop_the_scheduler(recorder: Recorder) -> None:
    s = Scheduler()
    stopped = threading.Event()

    def stop() -> None:
        s.stop()  # must not wait for its own thread
        stopped.set()

    s.schedule(at(0), stop)
    s.schedule(at(0.05), recorder.callback("after stop"), key="after stop")
    s.start()

    assert stopped.wait(WAIT)
    assert not s.running
    assert not recorder.wait_for(1, timeout=0.2)
    assert "after stop" in s


def test_executor_mode_submits_callbacks_to_the_executor(recorder: Recorder) -> None:
    threads: list[str] = []
    lock = threading.Lock()

    def record(key: str) -> Callable[[], None]:
        def run() -> None:
            with lock:
                threads.append(threading.current_thread().name)
            recorder.callback(key)()

        return run

    with (
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="pool") as pool,
        Scheduler(executor=pool) as s,
    ):
        when = at(0.1)
        s.schedule(when, record("a"))
        s.schedule(when + timedelta(seconds=0.05), record("b"))
        assert recorder.wait_for(2)

    assert sorted(recorder.keys) == ["a", "b"]
    assert all(name.startswith("pool") for name in threads)
    assert when.timestamp() <= recorder.time_of("a") < when.timestamp() + TOLERANCE


def test_executor_mode_logs_failing_callbacks(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise ValueError("bad")

    with (
        caplog.at_level(logging.ERROR, logger="after.scheduler"),
        ThreadPoolExecutor(max_workers=1) as pool,
        Scheduler(executor=pool) as s,
    ):
        s.schedule(at(0), boom, key="bad job")
        done = threading.Event()
        s.schedule(at(0.02), done.set)
        assert done.wait(WAIT)
        # The pool has one worker: the failure ran before `done.set`.

    failures = [r for r in caplog.records if r.name == "after.scheduler"]
    assert [r.exc_info[0] for r in failures if r.exc_info] == [ValueError]


def test_a_slow_callback_on_the_executor_does_not_delay_the_next(recorder: Recorder) -> None:
    release = threading.Event()
    with (
        ThreadPoolExecutor(max_workers=2) as pool,
        Scheduler(executor=pool) as s,
    ):
        s.schedule(at(0), lambda: release.wait(WAIT))
        when = at(0.1)
        s.schedule(when, recorder.callback("quick"))
        assert recorder.wait_for(1)
        release.set()

    assert recorder.time_of("quick") < when.timestamp() + TOLERANCE


# -- lifecycle ---------------------------------------------------------------


def test_context_manager_starts_and_stops() -> None:
    s = Scheduler()
    assert not s.running
    before = set(threading.enumerate())
    with s as entered:
        assert entered is s
        assert s.running
        timer_threads = set(threading.enumerate()) - before
        assert [t.name for t in timer_threads] == ["after-scheduler"]
    assert not s.running
    assert not any(t.is_alive() for t in timer_threads)


def test_stop_does_not_fire_pending_entries_and_start_resumes_them(recorder: Recorder) -> None:
    s = Scheduler()
    s.start()
    when = at(0.1)
    s.schedule(when, recorder.callback("pending"), key="pending")

    s.stop()

    assert not recorder.wait_for(1, timeout=0.25), "fired after stop()"
    assert s.pending() == [(when, "pending")]

    with s:
        assert recorder.wait_for(1)
    assert recorder.keys == ["pending"]


def test_start_twice_runs_one_timer_thread(recorder: Recorder) -> None:
    with Scheduler() as s:
        s.start()
        s.schedule(at(0.05), recorder.callback("once"))
        assert recorder.wait_for(1)
        fire_and_wait(s, at(0.05))
        assert recorder.keys == ["once"]


# -- concurrency -------------------------------------------------------------


def test_concurrent_schedule_and_cancel_fire_every_survivor_exactly_once(
    scheduler: Scheduler, recorder: Recorder
) -> None:
    threads, per_thread = 8, 100
    start = threading.Barrier(threads)
    base = at(1.0)  # later than scheduling 800 entries takes, even on a loaded machine
    survivors: set[Hashable] = set()
    cancelled: set[Hashable] = set()
    sets_lock = threading.Lock()

    def work(worker: int) -> None:
        start.wait()
        for i in range(per_thread):
            key = (worker, i)
            # Spread over 0.1 s, interleaved across workers.
            when = base + timedelta(milliseconds=(i * threads + worker) % 100)
            scheduler.schedule(when, recorder.callback(key), key=key)
            if i % 3 == 0:
                assert scheduler.cancel(key)
                with sets_lock:
                    cancelled.add(key)
            else:
                with sets_lock:
                    survivors.add(key)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    assert len(scheduler) == len(survivors)
    assert recorder.wait_for(len(survivors))
    fire_and_wait(scheduler, at(0.05))  # everything earlier has fired by now

    fired = recorder.keys
    assert len(fired) == len(set(fired)), "an entry fired twice"
    assert set(fired) == survivors
    assert not cancelled & set(fired)
    assert len(scheduler) == 0
    times = [t for _, t in recorder.calls]
    assert times == sorted(times)


def test_concurrent_cancels_of_one_key_succeed_exactly_once() -> None:
    s = Scheduler()
    s.schedule(at(60), lambda: None, key="contested")
    start = threading.Barrier(6)
    results: list[bool] = []
    lock = threading.Lock()

    def cancel() -> None:
        start.wait()
        result = s.cancel("contested")
        with lock:
            results.append(result)

    workers = [threading.Thread(target=cancel) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    assert sorted(results) == [False] * 5 + [True]


def test_many_cancelled_entries_do_not_accumulate(scheduler: Scheduler) -> None:
    # A live head keeps the timer thread from lazily dropping the cancelled ones behind it.
    scheduler.schedule(at(30), lambda: None, key="head")
    for i in range(10_000):
        key = scheduler.schedule(at(60 + i / 1000), lambda: None)
        assert scheduler.cancel(key)
    assert scheduler.pending() == [(scheduler.when("head"), "head")]
    # Internal, but it is the point: lazily cancelled entries are compacted away.
    assert len(scheduler._heap) < 200


def test_invalid_arguments_are_rejected() -> None:
    s = Scheduler()
    with pytest.raises(TypeError):
        s.schedule(time.time() + 1, lambda: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        s.schedule(at(1), "not callable")  # type: ignore[arg-type]
    assert len(s) == 0


def test_wait_until_returns_at_the_moment_not_before() -> None:
    for ahead in (0.0005, 0.003, 0.02):
        moment = time.time() + ahead
        wait_until(moment)
        returned = time.time()
        assert returned >= moment
        assert returned - moment < 0.05


def test_wait_until_a_moment_past_returns_at_once() -> None:
    began = time.monotonic()
    wait_until(time.time() - 10)
    assert time.monotonic() - began < 0.01
