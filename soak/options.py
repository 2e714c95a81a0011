"""What one soak run is made of: its options and their defaults.

The defaults make a run of about a minute and a half on a 2-core machine (a minute of
faults, then the tasks settle): 4 instances of 2 worker names, 300 tasks at the start
and about 3 client moves a second, a fault every 5 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

NAMES = ["manobi", "kodo"]


@dataclass
class Options:
    seconds: float = 60.0  # the faults' window; the settling comes after it
    instances: int = 4
    names: list[str] = field(default_factory=lambda: list(NAMES))
    tasks: int = 300  # written before the instances start; the clients create more
    url: str | None = None  # an Apache CouchDB; None: an embedded server of our own
    cluster: list[str] = field(default_factory=list)  # the nodes of a 3-node cluster
    cookie: str = ""  # the cluster's Erlang cookie: partitions
    faults: list[str] | None = None  # None: every kind that applies to the server
    mix: dict[str, float] = field(default_factory=dict)  # weights by kind
    fault_every: float = 5.0  # mean seconds between faults
    lease: float = 4.0
    heartbeat: float = 0.5
    horizon: float = 120.0
    concurrency: int = 4
    clients: int = 3
    client_rate: float = 1.0  # moves a second, per client
    keep: bool = False  # keep the work directory (and the database) even on success
    workdir: Path | None = None  # where each seed's directory is made (default: /tmp)
    verbose: bool = False  # print the fault schedule and every fault as carried out

    @property
    def server_kind(self) -> str:
        if self.cluster:
            return "cluster"
        return "couchdb" if self.url else "embedded"

    def replay(self, seed: int) -> str:
        """The command line that runs this seed again with these options."""
        parts = ["python -m soak", f"--seed {seed}", f"--seconds {self.seconds:g}"]
        parts += [f"--instances {self.instances}", f"--names {','.join(self.names)}"]
        parts += [f"--tasks {self.tasks}", f"--lease {self.lease:g}"]
        parts += [f"--heartbeat {self.heartbeat:g}", f"--fault-every {self.fault_every:g}"]
        parts += [f"--clients {self.clients}", f"--client-rate {self.client_rate:g}"]
        if self.faults is not None:
            parts.append(f"--faults {','.join(self.faults)}")
        if self.mix:
            parts.append("--mix " + ",".join(f"{k}={v:g}" for k, v in self.mix.items()))
        if self.url:
            parts.append("--url URL")
        if self.cluster:
            parts.append("--cluster URL,URL,URL" + (" --cookie COOKIE" if self.cookie else ""))
        return " ".join(parts)
