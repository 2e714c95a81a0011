"""`python -m soak`: the command line."""

from __future__ import annotations

import argparse
import random
import sys
import traceback
from pathlib import Path

from soak import nemesis
from soak.options import NAMES, Options
from soak.run import run_seed, settle_bound
from soak.servers import given_nodes

DESCRIPTION = """\
A soak with a nemesis (issue #31). Worker instances (real `python -m after start`
processes) run a database of tasks of every kind (one-off, due now, far future,
cron and interval repeats, retries, timeouts, failing jobs, results CouchDB cannot
store) while client threads create, cancel and reschedule tasks and a nemesis kills
and pauses instances and restarts, pauses or partitions the server at times drawn
from the seed. Then the faults stop, everything is healed, the tasks get a bounded
time to settle, and a checker holds the tasks against the jobs' own ledger and the
clients' moves. One result line per seed; exit status 1 when any seed failed (its
details printed, its work directory kept).
"""

EPILOG = """\
fault kinds: kill, pause, long_pause (instances, on every server); server_restart
(the embedded server); server_pause (an Apache CouchDB listening on this machine);
node_pause, node_isolate (a cluster on this machine; node_isolate needs --cookie).

examples:
  python -m soak                               one seed, embedded server, ~1.5 min
  python -m soak --seed 1,2,3 --seconds 45     three seeds
  python -m soak --faults kill,long_pause --mix kill=1,long_pause=3
  python -m soak --url http://admin:secret@127.0.0.1:5984/
  python -m soak --cluster http://admin:pw@127.0.0.1:15984/,http://127.0.0.1:25984/,\\
http://127.0.0.1:35984/ --cookie monster
"""


def seeds(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def names(text: str) -> list[str]:
    found = [part.strip() for part in text.split(",") if part.strip()]
    if not found:
        raise argparse.ArgumentTypeError("give at least one worker name")
    return found


def faults(text: str) -> list[str]:
    found = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [kind for kind in found if kind not in nemesis.FAULTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(nemesis.FAULTS)}"
        )
    return found


def mix(text: str) -> dict[str, float]:
    weights = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        if kind not in nemesis.FAULTS or not weight:
            raise argparse.ArgumentTypeError(f"--mix wants KIND=WEIGHT,...; got {part!r}")
        weights[kind] = float(weight)
    return weights


def parser() -> argparse.ArgumentParser:
    defaults = Options()
    p = argparse.ArgumentParser(
        prog="python -m soak",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--seed",
        type=seeds,
        action="append",
        metavar="N[,N...]",
        help="the seed of a run (its tasks, its faults); repeat it or give a list for "
        "several runs, one after the other. Default: one random seed, printed.",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--seconds",
        type=float,
        help=f"how long the faults go on, per seed (default {defaults.seconds:g}); the "
        "tasks then get a bounded time to settle",
    )
    length.add_argument("--minutes", type=float, help="the same, in minutes")
    p.add_argument(
        "--instances",
        type=int,
        default=defaults.instances,
        help="worker instances (processes), shared round-robin among the names "
        "(default %(default)s)",
    )
    p.add_argument(
        "--names",
        type=names,
        default=NAMES,
        metavar="NAME[,NAME...]",
        help=f"worker names (default {','.join(NAMES)})",
    )
    p.add_argument(
        "--tasks",
        type=int,
        default=defaults.tasks,
        help="tasks written before the instances start, of every kind; the clients "
        "create more while it runs (default %(default)s)",
    )
    p.add_argument(
        "--url",
        help="an Apache CouchDB server to run on (with an admin's credentials); the "
        "soak makes a database of its own there. Default: an embedded PouchDB Server "
        "started for each seed on a port of its own",
    )
    p.add_argument(
        "--cluster",
        type=given_nodes,
        metavar="URL,URL,URL",
        help="the nodes of a 3-node Apache CouchDB cluster on this machine (credentials "
        "in the first); each instance is given every node, a different one first",
    )
    p.add_argument(
        "--cookie",
        default="",
        help="the cluster's Erlang cookie: enables node_isolate (needs escript)",
    )
    p.add_argument(
        "--faults",
        type=faults,
        metavar="KIND[,KIND...]",
        help="the fault kinds to use (default: every kind that applies to the server)",
    )
    p.add_argument(
        "--mix",
        type=mix,
        default={},
        metavar="KIND=W[,...]",
        help="relative weights of the fault kinds (default "
        + ",".join(f"{k}={v}" for k, v in nemesis.DEFAULT_MIX.items())
        + ")",
    )
    p.add_argument(
        "--fault-every",
        type=float,
        default=defaults.fault_every,
        metavar="SECONDS",
        help="mean time between two faults (default %(default)s)",
    )
    p.add_argument(
        "--lease",
        type=float,
        default=defaults.lease,
        help="the instances' --lease, seconds (default %(default)s); long_pause pauses "
        "an instance for 1.5 to 2.5 leases",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=defaults.heartbeat,
        help="the instances' --heartbeat, seconds (default %(default)s)",
    )
    p.add_argument(
        "--horizon",
        type=float,
        default=defaults.horizon,
        help="the instances' --horizon, seconds; far-future tasks are dated well beyond "
        "it (default %(default)s)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="the instances' --concurrency (default %(default)s)",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=defaults.clients,
        help="client threads creating, canceling and rescheduling tasks (default %(default)s)",
    )
    p.add_argument(
        "--client-rate",
        type=float,
        default=defaults.client_rate,
        metavar="PER_SECOND",
        help="moves a second of each client (default %(default)s)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep each seed's work directory (logs, ledger, server data) and database "
        "even when it passes (a failing seed's are always kept)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the seeds' work directories are made (default: the temp directory)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the fault schedule and each fault as carried out",
    )
    return p


def options_from(args: argparse.Namespace) -> Options:
    seconds = args.seconds if args.seconds is not None else Options().seconds
    if args.minutes is not None:
        seconds = args.minutes * 60
    return Options(
        seconds=seconds,
        instances=args.instances,
        names=args.names,
        tasks=args.tasks,
        url=args.url,
        cluster=args.cluster or [],
        cookie=args.cookie,
        faults=args.faults,
        mix=args.mix,
        fault_every=args.fault_every,
        lease=args.lease,
        heartbeat=args.heartbeat,
        horizon=args.horizon,
        concurrency=args.concurrency,
        clients=args.clients,
        client_rate=args.client_rate,
        keep=args.keep,
        workdir=args.workdir,
        verbose=args.verbose,
    )


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    options = options_from(args)
    if options.cluster and len(options.cluster) < 3:
        p.error("--cluster wants the URLs of 3 nodes")
    if options.url and options.cluster:
        p.error("give --url or --cluster, not both")
    if options.lease <= options.heartbeat:
        p.error("--lease must be longer than --heartbeat")
    chosen = [seed for group in args.seed or [] for seed in group]
    if not chosen:
        chosen = [random.randrange(1, 100_000)]
        print(f"soak: no --seed given; this run's seed is {chosen[0]}")
    bound = settle_bound(options)
    print(
        f"soak: {len(chosen)} seed(s) {','.join(map(str, chosen))}, {options.seconds:g}s of "
        f"faults each, then up to {bound:.0f}s for the tasks to settle"
    )
    lines, failed = [], 0
    for seed in chosen:
        try:
            result = run_seed(options, seed)
        except Exception:
            failed += 1
            traceback.print_exc()
            lines.append(f"soak seed={seed} server={options.server_kind}: ERROR (see above)")
            print(lines[-1], flush=True)
            continue
        lines.append(result.line)
        print(result.line, flush=True)
        if not result.passed:
            failed += 1
            print("\n".join(result.details), flush=True)
    if len(chosen) > 1:
        print("\n".join(["soak summary:", *lines]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
