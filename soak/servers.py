"""The database server under test, and what the nemesis can do to it.

- `Embedded`: a PouchDB Server of the soak's own, started on a fixed port with its
  data in the run's directory; the nemesis kills it (SIGKILL) and starts it again on
  the same port and data, as a crash and a supervisor's restart would.
- `Single`: an Apache CouchDB given by URL. When it listens on this machine, the
  nemesis pauses its process (SIGSTOP) and resumes it.
- `Cluster`: the nodes of one Apache CouchDB cluster on this machine. The nemesis
  pauses a node, or, given the Erlang cookie, cuts a node's Erlang distribution off
  from the others while it keeps serving HTTP (a network partition), and heals it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from after import embedded
from after.config import node_urls, split_credentials, with_credentials
from after.couch import CouchError, Server


class ServerFault(RuntimeError):
    """A fault that could not be done (or undone) on the server."""


def admin(url: str) -> Server:
    """A client of `url`, with the credentials it carries (plain HTTP, After's client)."""
    plain, user, password = split_credentials(url)
    return Server(plain, (user, password or "") if user else None, timeout=10.0)


def port_of(url: str) -> int:
    plain = split_credentials(url)[0].rstrip("/")
    host_port = plain.split("://", 1)[1].split("/", 1)[0]
    if ":" in host_port:
        return int(host_port.rsplit(":", 1)[1])
    return 443 if plain.startswith("https") else 80


def listening_pid(port: int) -> int | None:
    """The process listening on a local TCP port, found through /proc (Linux); None when
    no process of ours listens there (a remote server, or another user's)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def signal_pid(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError as exc:
        raise ServerFault(f"process {pid} is gone") from exc


@dataclass
class Embedded:
    """A PouchDB Server of our own that can be killed and started again."""

    data: Path
    port: int = field(default_factory=embedded.free_port)
    process: subprocess.Popen | None = None
    restarts: int = 0
    name: str = "embedded"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def worker_url(self, slot: int) -> str:
        return self.url

    def faults(self) -> set[str]:
        return {"server_restart"}

    def start(self) -> None:
        # Killed with us if we die, but only when started from the main thread: the
        # parent-death signal follows the thread that forks, not the process.
        main = threading.current_thread() is threading.main_thread()
        self.process = embedded.start(
            self.port, self.data, self.data / "server.log", die_with_parent=main
        )
        embedded.wait_healthy(self.url, 60, self.process)

    def restart(self) -> None:
        """kill -9, then start again on the same port and the same data."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.restarts += 1
        self.start()

    def heal(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()

    def stop(self) -> None:
        if self.process is not None:
            embedded.stop(self.process)


@dataclass
class Single:
    """One Apache CouchDB (or any CouchDB) at a URL; paused when it runs here."""

    given: str
    name: str = "couchdb"
    pid: int | None = None
    paused: bool = False

    def __post_init__(self) -> None:
        self.pid = listening_pid(port_of(self.given))

    @property
    def url(self) -> str:
        return self.given

    def worker_url(self, slot: int) -> str:
        return self.given

    def faults(self) -> set[str]:
        return {"server_pause"} if self.pid else set()

    def start(self) -> None:
        admin(self.url).welcome()

    def pause(self) -> None:
        assert self.pid is not None
        signal_pid(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.pid is not None and self.paused:
            signal_pid(self.pid, signal.SIGCONT)
        self.paused = False

    def heal(self) -> None:
        self.resume()

    def stop(self) -> None:
        self.resume()


# Cuts a node's Erlang distribution off from its peers, or joins it again, by giving it
# another cookie for a while (its HTTP side keeps serving): a network split on one
# machine. tests/test_cluster.py uses it too.
PARTITION_ESCRIPT = """\
#!/usr/bin/env escript
%%! -name after_partition_{tag}@127.0.0.1 -hidden
main([Action, Cookie, Target | Others]) ->
    T = list_to_atom(Target),
    Peers = [list_to_atom(O) || O <- Others],
    Shared = list_to_atom(Cookie),
    Cut = after_partitioned,
    erlang:set_cookie(T, case Action of "cut" -> Shared; "heal" -> Cut end),
    pong = net_adm:ping(T),
    case Action of
        "cut" ->
            true = rpc:call(T, erlang, set_cookie, [Cut]),
            [rpc:call(T, erlang, disconnect_node, [P]) || P <- Peers];
        "heal" ->
            true = rpc:call(T, erlang, set_cookie, [Shared]),
            [rpc:call(T, net_kernel, connect_node, [P]) || P <- Peers]
    end,
    io:format("~p~n", [rpc:call(T, erlang, nodes, [])]).
"""


@dataclass
class Node:
    url: str  # with the credentials
    erlang_name: str
    pid: int | None
    paused: bool = False
    cut: bool = False


@dataclass
class Cluster:
    """The nodes of one CouchDB cluster on this machine."""

    given: list[str]  # each node's URL; the credentials of the first that has some apply
    cookie: str
    workdir: Path
    name: str = "cluster"
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        users = [split_credentials(u)[1:] for u in self.given]
        user, password = next(((u, p) for u, p in users if u), (None, None))
        self.user, self.password = user, password
        for url in self.given:
            plain = split_credentials(url)[0]
            full = with_credentials(plain, user, password)
            name = admin(full).json("GET", "_node/_local")["name"]
            self.nodes.append(Node(full, name, listening_pid(port_of(plain))))
        self.script = self.workdir / "partition.escript"

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def worker_url(self, slot: int) -> str:
        """Every node, a different one first for each instance slot (its own node)."""
        first = slot % len(self.nodes)
        ordered = self.nodes[first:] + self.nodes[:first]
        plain = ",".join(split_credentials(n.url)[0] for n in ordered)
        return with_credentials(plain, self.user, self.password)

    def faults(self) -> set[str]:
        found = set()
        if all(n.pid for n in self.nodes):
            found.add("node_pause")
        if self.cookie:
            found.add("node_isolate")
        return found

    def start(self) -> None:
        membership = admin(self.url).json("GET", "_membership")
        names = sorted(n.erlang_name for n in self.nodes)
        if sorted(membership["cluster_nodes"]) != names:
            raise ServerFault(f"the nodes given are not the cluster's: {membership}")

    def pause(self, index: int) -> None:
        node = self.nodes[index]
        assert node.pid is not None
        signal_pid(node.pid, signal.SIGSTOP)
        node.paused = True

    def resume(self, index: int) -> None:
        node = self.nodes[index]
        if node.pid is not None and node.paused:
            signal_pid(node.pid, signal.SIGCONT)
        node.paused = False

    def partition(self, index: int, action: str) -> str:
        """Cut node `index` off from the others ("cut") or join it again ("heal")."""
        if not self.script.exists():
            self.script.write_text(PARTITION_ESCRIPT.format(tag=uuid.uuid4().hex[:8]))
        node = self.nodes[index]
        peers = [n.erlang_name for n in self.nodes if n is not node]
        command = ["escript", str(self.script), action, self.cookie, node.erlang_name, *peers]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ServerFault(f"escript {action} {node.erlang_name}: {done.stdout}{done.stderr}")
        node.cut = action == "cut"
        return done.stdout.strip()

    def heal(self) -> None:
        for index, node in enumerate(self.nodes):
            self.resume(index)
            if node.cut:
                self.partition(index, "heal")

    def stop(self) -> None:
        self.heal()


Target = Embedded | Single | Cluster


def reachable(target: Target) -> bool:
    try:
        admin(target.url).welcome()
    except CouchError:
        return False
    return True


def given_nodes(text: str) -> list[str]:
    return node_urls(text)
