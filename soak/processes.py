"""Worker instances: real processes through the real CLI.

Each instance slot runs `python -m after start NAME --foreground` with its own
AFTER_HOME, its output in a log file of its own (a file, never a pipe: a full pipe
would block the worker). A slot killed by the nemesis gets a new process of the same
name (a new generation, as a supervisor would start it again). Every exit the
nemesis did not cause is recorded: an instance that died by itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "jobs"
READY_TIMEOUT = 60.0  # seconds for a new instance to write its state file


@dataclass
class Instance:
    slot: int
    name: str  # the worker name
    generation: int
    process: subprocess.Popen
    home: Path
    log: Path
    started: float  # time.time()
    paused_at: float | None = None
    ended: float | None = None
    expected_exit: bool = False  # killed by the nemesis, or stopped at the end

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def key(self) -> str:
        """What the ledger calls it (SOAK_INSTANCE)."""
        return f"{self.slot}.{self.generation}"

    @property
    def label(self) -> str:
        return f"{self.name}#{self.slot}.{self.generation} (pid {self.pid})"

    def alive(self) -> bool:
        return self.process.poll() is None

    def ready(self) -> bool:
        return (self.home / "workers" / f"{self.name}.json").exists()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Died:
    instance: Instance
    returncode: int | None
    tail: str


@dataclass
class Instances:
    """The worker processes of one soak run."""

    workdir: Path
    names: list[str]
    count: int
    database: str
    ledger: Path
    url_for: Callable[[int], str]  # slot -> its AFTER_COUCHDB_URL (Target.worker_url)
    heartbeat: float
    lease: float
    horizon: float
    concurrency: int
    current: dict[int, Instance] = field(default_factory=dict)
    every: list[Instance] = field(default_factory=list)  # all generations, for the logs
    died: list[Died] = field(default_factory=list)

    def name_of(self, slot: int) -> str:
        return self.names[slot % len(self.names)]

    def launch(self, slot: int, wait: bool = True) -> Instance:
        name = self.name_of(slot)
        generation = sum(1 for i in self.every if i.slot == slot)
        home = self.workdir / f"home-{slot}"
        home.mkdir(parents=True, exist_ok=True)
        # The state file of the previous generation would pass for the new one's.
        (home / "workers" / f"{name}.json").unlink(missing_ok=True)
        env = {
            **os.environ,
            "AFTER_COUCHDB_URL": self.url_for(slot),
            "AFTER_DB": self.database,
            "AFTER_HOME": str(home),
            "AFTER_CONFIG": "",  # never the user's own ~/.after/config.toml
            "SOAK_LEDGER": str(self.ledger),
            "SOAK_INSTANCE": f"{slot}.{generation}",  # the ledger's name of this process
        }
        command = [sys.executable, "-m", "after", "start", name, "--foreground"]
        command += ["--jobs", str(JOBS), "--heartbeat", str(self.heartbeat)]
        command += ["--lease", str(self.lease), "--horizon", str(self.horizon)]
        command += ["--concurrency", str(self.concurrency)]
        log = self.workdir / f"worker-{slot}.{generation}.log"
        with open(log, "w") as output:
            process = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=output, cwd=REPO
            )
        instance = Instance(slot, name, generation, process, home, log, time.time())
        self.current[slot] = instance
        self.every.append(instance)
        if wait:
            self.wait_ready(instance)
        return instance

    def wait_ready(self, instance: Instance) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not instance.ready() and instance.alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def start_all(self) -> None:
        started = [self.launch(slot, wait=False) for slot in range(self.count)]
        for instance in started:
            self.wait_ready(instance)

    def kill(self, slot: int) -> Instance:
        """kill -9 the slot's process, then start a new instance of the same name."""
        old = self.current[slot]
        old.expected_exit = True
        if old.alive():
            old.process.send_signal(signal.SIGKILL)
        old.process.wait(30)
        old.ended = time.time()
        return self.launch(slot)

    def pause(self, slot: int) -> bool:
        instance = self.current[slot]
        if instance.paused_at is not None or not instance.alive():
            return False
        instance.process.send_signal(signal.SIGSTOP)
        instance.paused_at = time.time()
        return True

    def resume(self, instance: Instance) -> None:
        if instance.paused_at is not None and instance.alive():
            instance.process.send_signal(signal.SIGCONT)
        instance.paused_at = None

    def check(self) -> list[Died]:
        """Instances that exited without the nemesis killing them: recorded, and started
        again so the run goes on."""
        found = []
        for slot, instance in list(self.current.items()):
            if instance.alive() or instance.expected_exit:
                continue
            instance.ended = time.time()
            tail = "\n".join(instance.log_text().splitlines()[-30:])
            died = Died(instance, instance.process.returncode, tail)
            self.died.append(died)
            found.append(died)
            self.launch(slot, wait=False)
        return found

    def resume_all(self) -> None:
        for instance in self.current.values():
            self.resume(instance)

    def stop_all(self) -> None:
        for instance in self.every:
            instance.expected_exit = True
            if instance.alive():
                if instance.paused_at is not None:
                    instance.process.send_signal(signal.SIGCONT)
                instance.process.kill()
        for instance in self.every:
            with contextlib.suppress(subprocess.TimeoutExpired):
                instance.process.wait(30)

    def by_pid(self) -> dict[int, Instance]:
        return {instance.pid: instance for instance in self.every}
