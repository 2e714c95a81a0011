"""What an instance's job pool can run on time: the limits on claims and commits.

An instance claims a task (writes `scheduled`) only when it can start the task
on time, so that a busy instance leaves work to its idle peers; and it commits
a run (writes `running`) only when a pool slot will be free for it, so that
`running` in the database means the job is about to start, and a crash never
marks as "worker lost" a run that never began.

The model is deliberately simple and cheap (O(1) per decision):
- the pool has `slots`; a run takes `average` seconds (measured, smoothed);
  until a run has ended the average is unknown and treated as "instant";
- a running job is expected to end after max(average, twice what it has run
  so far): a job that has run a long time is likely to run a while longer;
- tasks held and not yet started are counted per second of their due time:
  in one second the pool starts at most max(slots, slots / average) runs.
Everything here is plain bookkeeping, safe to call from several threads.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field

ON_TIME = 0.25  # seconds of lateness that still count as "on time" for a claim
SMOOTHING = 0.2  # weight of the latest run in the moving average of run durations


@dataclass
class Pool:
    """One instance's job pool, as seen by the claim and commit decisions.

    Times are floats: `due` and `now` in seconds since the epoch (task dates),
    run starts and ends on any one clock (the worker passes time.monotonic()).
    """

    slots: int
    average: float | None = None  # seconds per run; None until a run has ended
    running: dict[str, float] = field(default_factory=dict)  # task id -> start
    committing: set[str] = field(default_factory=set)  # `running` written/writing, not started
    held_second: dict[str, int] = field(default_factory=dict)  # task id -> second it is due
    per_second: Counter[int] = field(default_factory=Counter)  # held tasks due in each second
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"a pool needs at least one slot, not {self.slots}")

    # -- bookkeeping ----------------------------------------------------------------
    def hold(self, task_id: str, due: float) -> None:
        """The task is claimed and waits for its date."""
        with self.lock:
            self._release(task_id)
            second = math.floor(due)
            self.held_second[task_id] = second
            self.per_second[second] += 1

    def commit(self, task_id: str) -> None:
        """Its `running` is being written: it takes a slot from now on."""
        with self.lock:
            self.committing.add(task_id)

    def uncommit(self, task_id: str) -> None:
        """Its commit failed or was undone: it no longer takes a slot."""
        with self.lock:
            self.committing.discard(task_id)

    def started(self, task_id: str, at: float) -> None:
        with self.lock:
            self._release(task_id)
            self.running[task_id] = at

    def not_begun(self, task_id: str) -> None:
        """A run handed to the executor did not begin after all: committed again."""
        with self.lock:
            self.running.pop(task_id, None)
            self.committing.add(task_id)

    def ended(self, task_id: str, at: float, began: float | None = None) -> None:
        """The run ended at `at`; `began` is when the job itself began, if known. A run
        handed to a busy executor waits for a thread: that wait is not its run time
        (counted in, a burst's queue would make every run look long, and the pool
        refuse claims it has room for)."""
        with self.lock:
            start = self.running.pop(task_id, None)
            if start is None:
                return
            seconds = max(at - (start if began is None else max(began, start)), 0.0)
            if self.average is None:
                self.average = seconds
            else:
                self.average += SMOOTHING * (seconds - self.average)

    def release(self, task_id: str) -> None:
        """Let go of the task (handed back, canceled, forgotten); idempotent."""
        with self.lock:
            self._release(task_id)

    def _release(self, task_id: str) -> None:
        self.committing.discard(task_id)
        second = self.held_second.pop(task_id, None)
        if second is not None:
            self.per_second[second] -= 1
            if self.per_second[second] <= 0:
                del self.per_second[second]

    # -- decisions ----------------------------------------------------------------
    def starts_per_second(self) -> float:
        if not self.average:
            return math.inf
        return max(float(self.slots), self.slots / self.average)

    def expected_end(self, start: float, now: float) -> float:
        return start + max(self.average or 0.0, 2 * (now - start))

    def room(self, window: float, clock: float) -> float:
        """How many more runs can start within `window` seconds from `clock`,
        after the runs and commits under way (inf while run times are unknown)."""
        with self.lock:
            until = clock + window
            busy = sum(1 for s in self.running.values() if self.expected_end(s, clock) > until)
            free = self.slots - busy
            if free <= 0:
                return 0.0
            starts = free * (1 + window / self.average) if self.average else math.inf
            return starts - len(self.committing)

    def can_claim(self, due: float, now: float, clock: float) -> bool:
        """Can a task due at `due` start on time here, besides what is held already?

        `now` is on the clock of task dates, `clock` on that of run starts.
        """
        with self.lock:
            if self.per_second[math.floor(due)] >= self.starts_per_second():
                return False  # that second is already full
        # A slot must be free by then, after the runs and commits under way.
        return self.room(max(due - now, 0.0) + ON_TIME, clock) >= 1

    def can_commit(self, lead: float, clock: float) -> bool:
        """May one more run be committed now, to start within `lead` seconds?"""
        return self.room(lead, clock) >= 1
