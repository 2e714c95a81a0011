"""The nemesis: faults at times drawn from the seed.

The whole schedule (when, which kind, which instance or node, for how long) is drawn
from the seed before the run, so the same seed gives the same faults in the same order
(`schedule`, printed with --verbose). What each fault meets (which tasks an instance
holds when it is killed) depends on timing and is not reproducible; the schedule is.

Instance faults: `kill` (SIGKILL, then a new instance of the same name), `pause`
(SIGSTOP, SIGCONT well within the lease), `long_pause` (longer than the lease: its
peers take its tasks over while it is stopped, and it wakes up to find them gone).
Server faults: `server_restart` (the embedded server killed with SIGKILL and started
again on its port and data), `server_pause` (an Apache CouchDB on this machine,
SIGSTOP then SIGCONT), `node_pause` and `node_isolate` (a cluster's node paused, or cut
off from the others' Erlang distribution while it serves HTTP, then healed). Instance
pauses overlap other faults; a server fault is carried out to its end before the next
fault, so no instance is started while the server is away (an instance that cannot
reach its server at start-up stops, by design).
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from soak.processes import Instances
from soak.servers import Cluster, Embedded, ServerFault, Single, Target

INSTANCE_FAULTS = ("kill", "pause", "long_pause")
SERVER_FAULTS = ("server_restart", "server_pause", "node_pause", "node_isolate")
FAULTS = INSTANCE_FAULTS + SERVER_FAULTS
DEFAULT_MIX = {
    "kill": 3,
    "pause": 3,
    "long_pause": 2,
    "server_restart": 1,
    "server_pause": 1,
    "node_pause": 1,
    "node_isolate": 2,
}
FIRST = 3.0  # seconds into the run before the first fault: every instance is up


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the start of the run
    kind: str
    target: int  # an instance slot, or a cluster node's index
    hold: float  # seconds paused or cut off (0: kill, restart)

    def line(self) -> str:
        hold = f" for {self.hold:.1f}s" if self.hold else ""
        return f"t={self.at:5.1f}s {self.kind} #{self.target}{hold}"


def schedule(
    seed: int,
    seconds: float,
    kinds: list[str],
    mix: dict[str, float],
    every: float,
    instances: int,
    nodes: int,
    lease: float,
) -> list[Fault]:
    """The faults of a run, from the seed alone."""
    rng = random.Random(f"nemesis-{seed}")
    weights = [mix.get(kind, 1.0) for kind in kinds]
    faults: list[Fault] = []
    at = FIRST + rng.uniform(0, every)
    while kinds and at < seconds - 2.0:
        kind = rng.choices(kinds, weights)[0]
        target = rng.randrange(nodes if kind.startswith("node_") else instances)
        hold = {
            "pause": rng.uniform(0.2, 0.6) * lease,
            "long_pause": rng.uniform(1.5, 2.5) * lease,
            "server_pause": rng.uniform(1.0, 5.0),
            "node_pause": rng.uniform(2.0, max(2.5, 1.5 * lease)),
            "node_isolate": rng.uniform(0.5, 2.0) * lease,
        }.get(kind, 0.0)
        faults.append(Fault(round(at, 2), kind, target, round(hold, 2)))
        at += rng.uniform(0.5, 1.5) * every
    return faults


@dataclass
class Done:
    """A fault as carried out."""

    fault: Fault
    began: float  # time.time()
    ended: float = 0.0
    note: str = ""

    def line(self) -> str:
        took = f", {self.ended - self.began:.1f}s" if self.ended else ""
        return f"{self.fault.line()}: {self.note}{took}"


@dataclass
class Nemesis:
    faults: list[Fault]
    instances: Instances
    target: Target
    progress: Callable[[], None]  # called about every `progress_every` seconds
    progress_every: float = 10.0
    done: list[Done] = field(default_factory=list)
    skipped: list[tuple[Fault, str]] = field(default_factory=list)
    _undo: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _order: int = 0

    def counts(self) -> Counter[str]:
        return Counter(d.fault.kind for d in self.done)

    def last_ended(self) -> float:
        return max((d.ended or d.began for d in self.done), default=0.0)

    def run(self, start: float, seconds: float) -> None:
        """Carry the schedule out from `start` (time.time()) for `seconds`, then heal."""
        next_progress = start + self.progress_every
        pending = list(self.faults)
        end = start + seconds
        while True:
            now = time.time()
            if now >= next_progress:
                self.progress()
                next_progress += self.progress_every
            self.instances.check()
            self.undo_due(now)
            if pending and start + pending[0].at <= now:
                self.carry_out(pending.pop(0))
                continue
            if now >= end:
                break
            wake = min(
                end,
                next_progress,
                start + pending[0].at if pending else end,
                self._undo[0][0] if self._undo else end,
                now + 0.2,
            )
            time.sleep(max(0.0, wake - time.time()))
        self.heal()

    def wait(self, seconds: float) -> None:
        """Sleep through a server fault, resuming instances whose pause ends meanwhile."""
        until = time.time() + seconds
        while (now := time.time()) < until:
            self.undo_due(now)
            self.instances.check()
            time.sleep(min(0.1, until - now))

    def later(self, at: float, action: Callable[[], None]) -> None:
        self._order += 1
        heapq.heappush(self._undo, (at, self._order, action))

    def undo_due(self, now: float) -> None:
        while self._undo and self._undo[0][0] <= now:
            _, _, action = heapq.heappop(self._undo)
            action()

    def carry_out(self, fault: Fault) -> None:
        record = Done(fault, time.time())
        try:
            self.do(fault, record)
        except (ServerFault, OSError) as exc:
            record.note += f" failed: {exc}"
            record.ended = time.time()
        if record.note.startswith("skipped"):
            self.skipped.append((fault, record.note))
        else:
            self.done.append(record)

    def do(self, fault: Fault, record: Done) -> None:
        instances, target = self.instances, self.target
        if fault.kind == "kill":
            old = instances.current[fault.target]
            new = instances.kill(fault.target)
            record.note = f"killed {old.label}; started {new.label}"
            record.ended = time.time()
        elif fault.kind in ("pause", "long_pause"):
            instance = instances.current[fault.target]
            if not instances.pause(fault.target):
                record.note = f"skipped: {instance.label} is paused already"
                return
            record.note = f"paused {instance.label}"

            def resume() -> None:
                instances.resume(instance)
                record.ended = time.time()

            self.later(time.time() + fault.hold, resume)
        elif fault.kind == "server_restart" and isinstance(target, Embedded):
            target.restart()
            record.note = f"server killed and started again (restart {target.restarts})"
            record.ended = time.time()
        elif fault.kind == "server_pause" and isinstance(target, Single):
            target.pause()
            record.note = f"server pid {target.pid} paused"
            try:
                self.wait(fault.hold)
            finally:
                target.resume()
            record.ended = time.time()
        elif fault.kind == "node_pause" and isinstance(target, Cluster):
            node = target.nodes[fault.target]
            target.pause(fault.target)
            record.note = f"node {node.erlang_name} paused"
            try:
                self.wait(fault.hold)
            finally:
                target.resume(fault.target)
            record.ended = time.time()
        elif fault.kind == "node_isolate" and isinstance(target, Cluster):
            node = target.nodes[fault.target]
            reaches = target.partition(fault.target, "cut")
            record.note = f"node {node.erlang_name} cut off (it reaches {reaches})"
            try:
                self.wait(fault.hold)
            finally:
                target.partition(fault.target, "heal")
            record.ended = time.time()
        else:
            record.note = f"skipped: {fault.kind} does not apply to a {target.name} server"

    def heal(self) -> None:
        """Every fault undone: instances resumed, the server up, nodes joined again."""
        for _, _, action in sorted(self._undo):
            action()
        self._undo.clear()
        self.target.heal()
        self.instances.resume_all()
        self.instances.check()
