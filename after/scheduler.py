"""An in-memory timer: schedule a callable at a datetime, in your own program.

    with Scheduler() as scheduler:
        scheduler.schedule(datetime.now(UTC) + timedelta(seconds=5), send_report)

One daemon thread sleeps exactly until the next due entry and runs it. Entries
due at the same moment, and overdue ones, run in order of their time, then in
the order they were scheduled. Callbacks run on that thread unless an executor
is given, so without one they should be short: a slow callback delays every
entry behind it. Nothing is persisted; entries pending at exit are lost.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

__all__ = ["Scheduler"]

logger = logging.getLogger("after.scheduler")

# The longest single sleep: time.time() can jump (NTP, suspend, manual change)
# while the condition waits on the monotonic clock, so look at the wall clock
# again at least this often.
MAX_WAIT = 30.0

# Cancelled or replaced entries stay in the heap until popped; rebuild it when
# they outnumber the live ones, so the heap stays O(live entries).
_COMPACT_MIN = 64


@dataclass(slots=True)
class _Entry:
    when: datetime
    timestamp: float
    seq: int
    fn: Callable[[], object]


class Scheduler:
    """Runs callables at given datetimes on one timer thread.

    Every public method is thread-safe and may be called from inside a callback.
    """

    def __init__(self, executor: Executor | None = None) -> None:
        """Without an executor callbacks run on the timer thread; with one they are
        submitted to it (and may then run concurrently, in any order)."""
        self._executor = executor
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Hashable]] = []
        self._entries: dict[Hashable, _Entry] = {}
        self._dead = 0  # heap items no longer matching a live entry
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        # Each timer thread serves one generation; stop() ends it by moving on.
        self._generation = 0
        self._running = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the timer thread; does nothing if it is already running."""
        with self._cond:
            if self._running:
                return
            self._running = True
            self._generation += 1
            self._thread = threading.Thread(
                target=self._run, args=(self._generation,), name="after-scheduler", daemon=True
            )
            self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop the timer thread without running anything more.

        Pending entries are kept and run if the scheduler is started again. With
        `wait`, return only once the thread has finished its current callback
        (not when called from a callback, which would wait for itself). Callbacks
        already submitted to an executor are left to it.
        """
        with self._cond:
            thread = self._thread
            self._running = False
            self._generation += 1
            self._thread = None
            self._cond.notify_all()
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def running(self) -> bool:
        """Whether the timer thread has been started and not stopped."""
        with self._cond:
            return self._running

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- entries -----------------------------------------------------------

    def schedule(
        self, when: datetime, fn: Callable[[], object], key: Hashable | None = None
    ) -> Hashable:
        """Run `fn` at `when` (naive means UTC) and return its key.

        Without a key a new unique one is made; an existing key's entry is replaced.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        when = _aware(when)
        if key is None:
            key = uuid.uuid4().hex
        with self._cond:
            if key in self._entries:
                self._dead += 1
            self._push(key, when, fn)
        return key

    def cancel(self, key: Hashable) -> bool:
        """Drop a pending entry; False if there was none (unknown, done or cancelled)."""
        with self._cond:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._dead += 1
            if self._heap[0][1] == entry.seq:
                # The thread sleeps until this entry: let it pick the next one.
                self._cond.notify_all()
            self._maybe_compact()
            return True

    def reschedule(self, key: Hashable, when: datetime) -> bool:
        """Move a pending entry to `when`; False if there is no such entry.

        It then ranks after entries already scheduled for the same moment.
        """
        when = _aware(when)
        with self._cond:
            entry = self._entries.get(key)
            if entry is None:
                return False
            self._dead += 1
            self._push(key, when, entry.fn)
            return True

    def when(self, key: Hashable) -> datetime | None:
        """The time a pending entry is due, or None."""
        with self._cond:
            entry = self._entries.get(key)
            return None if entry is None else entry.when

    def pending(self) -> list[tuple[datetime, Hashable]]:
        """All pending entries as (when, key), in the order they will run."""
        with self._cond:
            items = sorted(self._entries.items(), key=lambda item: (item[1].timestamp, item[1].seq))
        return [(entry.when, key) for key, entry in items]

    def __contains__(self, key: object) -> bool:
        with self._cond:
            return key in self._entries

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Scheduler {state}, {len(self)} pending>"

    # -- internals (callers hold the lock) -----------------------------------

    def _push(self, key: Hashable, when: datetime, fn: Callable[[], object]) -> None:
        # The unique seq breaks ties, so keys (maybe unorderable) are never compared.
        entry = _Entry(when, when.timestamp(), next(self._seq), fn)
        self._entries[key] = entry
        heapq.heappush(self._heap, (entry.timestamp, entry.seq, key))
        self._maybe_compact()
        if self._heap[0][1] == entry.seq:  # a new head: the thread sleeps too long
            self._cond.notify_all()

    def _is_live(self, item: tuple[float, int, Hashable]) -> bool:
        entry = self._entries.get(item[2])
        return entry is not None and entry.seq == item[1]

    def _maybe_compact(self) -> None:
        if self._dead > _COMPACT_MIN and self._dead > len(self._entries):
            self._heap = [(e.timestamp, e.seq, k) for k, e in self._entries.items()]
            heapq.heapify(self._heap)
            self._dead = 0

    def _next_due(self, generation: int) -> tuple[Hashable, _Entry] | None:
        """Wait for the next due entry and take it; None once this generation is stopped."""
        with self._cond:
            while self._generation == generation:
                while self._heap and not self._is_live(self._heap[0]):
                    heapq.heappop(self._heap)
                    self._dead -= 1
                if not self._heap:
                    self._cond.wait(MAX_WAIT)
                    continue
                delay = self._heap[0][0] - time.time()
                if delay > 0:
                    self._cond.wait(min(delay, MAX_WAIT))
                    continue
                _, _, key = heapq.heappop(self._heap)
                return key, self._entries.pop(key)
            return None

    # -- timer thread ----------------------------------------------------------

    def _run(self, generation: int) -> None:
        while (due := self._next_due(generation)) is not None:
            key, entry = due
            if self._executor is None:
                _call(key, entry.fn)
                continue
            try:
                self._executor.submit(_call, key, entry.fn)
            except Exception:  # e.g. the executor was shut down
                logger.exception("could not submit the callback for %r", key)


def wait_until(moment: float, spin: float = 0.001) -> None:
    """Return at `moment` (seconds since the epoch), as punctually as a thread can.

    It sleeps until `spin` seconds before, then busy-waits: a thread woken from
    a sleep on a busy machine can be a few milliseconds late.
    """
    remaining = moment - time.time()
    if remaining > spin:
        time.sleep(remaining - spin)
    while time.time() < moment:
        pass  # busy-wait on purpose: at most `spin` seconds


def _call(key: Hashable, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:
        logger.exception("scheduled callback for %r failed", key)


def _aware(when: datetime) -> datetime:
    if not isinstance(when, datetime):
        raise TypeError(f"when must be a datetime, not {type(when).__name__}")
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when
