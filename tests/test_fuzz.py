"""Fuzzing the task contract against the real server, with hypothesis.

Thousands of generated documents and updates (random and near-miss tasks:
wrong types, missing fields, bad dates, huge and deeply nested arguments,
unicode edge cases, forbidden transitions, foreign and worker-owned fields,
unknown types, near-miss schedule fields, worker records) are sent through
`_bulk_docs` as a client, as a worker and anonymously, each with its own real
credentials (users created in `_users`, as tests/test_roles.py does). On the
embedded PouchDB Server in its default admin party an anonymous request is a
server admin, and is judged as one; with an admin configured it gets 401.

Every answer is compared with an oracle written here in Python from
`designdocs/after/lib/rules.json` and the README (patterns, statuses, the
table, the worker's fields), independently of validate_doc_update.js: a write
is either accepted, and the oracle accepts it and the stored document is what
was sent, or refused with 403/401 and a reason, never a 500. At the end every
document in the database is read back and checked.

Updates take stored documents (seeded in every status, then whatever the
fuzzing left) and apply drawn changes: moves of the table by the right or the
wrong role, random statuses, field edits and drops, worker-owned and foreign
fields, deletions, stale revisions. Each is judged against the version stored
when it was sent; a 409, or a 403 on PouchDB Server, is accepted only when the
revision was stale or the worker wrote in between.

Meanwhile a worker named "fuzz" (running with the worker user's credentials)
follows the feed. Most generated tasks name it, with dates far in the future,
so it reads every shape the server accepts but claims only the few that are
due; it must not crash or log an error, must leave nothing inconsistent, still
complete a normal task at the end, and a second instance must start on what is
left. What the fuzzing found (and what was fixed since) is pinned at the end of
this file by tests of their own; the fuzzing still steers around a few shapes
(Fuzz.for_the_worker, and no "hasOwnProperty" inside the schedule fields) that
those tests cover one by one.
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import REPO, new_task, wait_for
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from after import tasks
from after.config import Config
from after.couch import CouchError, Database, Forbidden, Server, json_problem
from after.security import admin_party, security_object
from after.worker import Worker

RULES: dict[str, Any] = json.loads(
    (REPO / "designdocs" / "after" / "lib" / "rules.json").read_text(encoding="utf-8")
)
STATUSES: list[str] = RULES["statuses"]
INITIAL: str = RULES["initial"]
FINAL: list[str] = RULES["final"]
TRANSITIONS: dict[str, dict[str, str]] = RULES["transitions"]
DELETABLE: list[str] = RULES["deletable"]
WORKER_FIELDS: list[str] = RULES["worker_fields"]
FORCE: str = RULES["force_field"]
PREFIX: str = RULES["record_prefix"]

EMBEDDED = not os.environ.get("AFTER_TEST_COUCHDB_URL")  # the session's PouchDB Server
FUZZ_WORKER = "fuzz"  # the worker that follows the feed during the run
EXAMPLES = 110  # hypothesis examples; each sends CREATES new documents and UPDATES updates
CREATES = 64
UPDATES = 64
MIN_SENT = 10_000


def has_shape(value: Any, kind: str) -> bool:
    """validate_doc_update's checkWorkerFieldShapes, for one field."""
    if kind == "count":
        return is_number(value) and value % 1 == 0 and value >= 0
    if kind == "number":
        return is_number(value)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "boolean":
        return isinstance(value, bool)
    return isinstance(value, str)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def deeper_than(value: Any, limit: int) -> bool:
    """validate_doc_update's deeperThan: a chain of more than `limit` nested containers."""
    if not isinstance(value, dict | list):
        return False
    if limit == 0:
        return True
    children = value.values() if isinstance(value, dict) else value
    return any(deeper_than(child, limit - 1) for child in children)


MAX_DEPTH = 300  # nesting depth of generated arguments (Python's json recursion allows ~900)
MAX_BIG = 700_000  # bytes of one huge argument: every document stays under 1 MB


# -- JavaScript semantics, where the oracle must read values as validate_doc_update does --------


def js_regex(pattern: str) -> re.Pattern[str]:
    """A rules.json pattern with JavaScript's meaning: \\d is ASCII only, and `$` is the
    very end (Python's `$` also matches before a final newline)."""
    return re.compile(pattern.replace("$", r"\Z"), re.ASCII)


PATTERNS = {name: js_regex(pattern) for name, pattern in RULES["patterns"].items()}
# JavaScript's \s and String.prototype.trim: WhiteSpace and LineTerminator.
JS_SPACE = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
JS_TRIM = re.compile(f"^[{JS_SPACE}]+|[{JS_SPACE}]+\\Z")
JS_SPLIT = re.compile(f"[{JS_SPACE}]+")
JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?", re.ASCII)
# cronsim's nicknames, which the README says work in repeat.cron.
CRON_NICKNAMES = ["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"]


def js_number_string(x: float) -> str:
    """String(x) for a JavaScript number (ECMAScript Number::toString)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "0"
    if x < 0:
        return "-" + js_number_string(-x)
    _, digit_tuple, exponent = decimal.Decimal(repr(x)).as_tuple()
    digits = "".join(map(str, digit_tuple))
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    digits, k = stripped, len(stripped)
    n = int(exponent) + k
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    e = n - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


def reads_back_as_itself(name: str) -> bool:
    """String(JSON.parse(name)) === name, or name is not JSON at all."""
    if JSON_NUMBER.fullmatch(name):
        return js_number_string(float(name)) == name
    return True  # true/false/null read back as themselves; anything else is not JSON


class Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = Missing()  # a field that is not there (JavaScript's undefined)


def _js_normal(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        number = float(value)
        return 0.0 if number == 0 else number  # JSON.stringify(-0) is "0"
    if isinstance(value, list):
        return [_js_normal(item) for item in value]
    return {key: _js_normal(item) for key, item in value.items()}


def js_json(value: Any) -> str | None:
    """JSON.stringify(value), as far as equality goes (key order kept, numbers as doubles)."""
    if value is MISSING:
        return None
    return json.dumps(_js_normal(value), separators=(",", ":"))


def get(doc: dict[str, Any], key: str) -> Any:
    return doc.get(key, MISSING) if isinstance(doc, dict) else MISSING


def is_object(value: Any) -> bool:
    return isinstance(value, dict)


def is_count(value: Any, low: float, high: float) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and float(value).is_integer()
        and low <= value <= high
    )


# -- the oracle --------------------------------------------------------------------------------


class Refused(Exception):
    """The oracle's refusal, with the rule it applied."""


@dataclass
class Judgement:
    """What the oracle expects: "accept" or "refuse", or "either" where the README and the
    design document are known to disagree (`unsure` names the known discrepancy)."""

    verdict: str
    rule: str = ""
    unsure: list[str] = field(default_factory=list)


class Oracle:
    """The rules of README.md and rules.json, written again in Python."""

    def __init__(self) -> None:
        self.unsure: list[str] = []

    def days_in_month(self, year: int, month: int) -> int:
        if month == 2:
            leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
            return 29 if leap else 28
        return 30 if month in (4, 6, 9, 11) else 31

    def date(self, name: str, value: Any) -> None:
        if not isinstance(value, str):
            raise Refused(f"{name}: not a string")
        m = PATTERNS["date"].match(value)
        if not m:
            raise Refused(f"{name}: not ISO 8601")
        year, month, day = int(m[1]), int(m[2]), int(m[3])
        if not 1000 <= year <= 9998:
            raise Refused(f"{name}: year out of range")
        if not 1 <= month <= 12 or not 1 <= day <= self.days_in_month(year, month):
            raise Refused(f"{name}: not a real calendar date")
        if year == 0 and month == 2 and day == 29:
            # Year 0 is a leap year of the proleptic Gregorian calendar; JavaScript's
            # Date.UTC reads years 0-99 as 1900-1999, and 1900 is not one.
            self.unsure.append("0000-02-29: Date.UTC reads year 0 as 1900")
        if m[4] is not None and (
            int(m[4]) > 23 or int(m[5]) > 59 or (m[6] is not None and int(m[6]) > 59)
        ):
            raise Refused(f"{name}: time out of range")
        if m[8] and m[8] != "Z" and (int(m[8][1:3]) > 23 or int(m[8][4:6]) > 59):
            raise Refused(f"{name}: offset out of range")

    def duration(self, name: str, value: Any) -> None:
        if not isinstance(value, str) or not PATTERNS["duration"].match(value):
            raise Refused(f"{name}: not an ISO 8601 duration")

    def only(self, name: str, value: dict[str, Any], allowed: list[str]) -> None:
        for key in value:
            if key not in allowed:
                raise Refused(f"{name}.{key}: unknown field")

    def cron(self, value: Any) -> None:
        fields = JS_SPLIT.split(JS_TRIM.sub("", value)) if isinstance(value, str) else []
        if len(fields) == 1 and re.search(RULES["patterns"]["cron_macro"], fields[0]):
            return  # @daily, @hourly, ...
        if not 5 <= len(fields) <= 6:
            raise Refused("repeat.cron: not 5 or 6 fields")
        for one in fields:
            if not PATTERNS["cron_field"].match(one):
                raise Refused("repeat.cron: a field has characters a cron field cannot have")

    def schedule(self, doc: dict[str, Any]) -> None:
        repeat, misfire, retry = get(doc, "repeat"), get(doc, "misfire"), get(doc, "retry")
        if repeat is not MISSING:
            if not is_object(repeat):
                raise Refused("repeat: not an object")
            self.only("repeat", repeat, ["cron", "interval", "timezone", "limit", "until"])
            if (get(repeat, "cron") is MISSING) == (get(repeat, "interval") is MISSING):
                raise Refused("repeat: needs exactly one of cron or interval")
            if get(repeat, "cron") is not MISSING:
                self.cron(repeat["cron"])
            if get(repeat, "interval") is not MISSING:
                self.duration("repeat.interval", repeat["interval"])
            timezone = get(repeat, "timezone")
            if timezone is not MISSING and (
                not isinstance(timezone, str) or not PATTERNS["timezone"].match(timezone)
            ):
                raise Refused("repeat.timezone: not an IANA name")
            if get(repeat, "limit") is not MISSING and not is_count(repeat["limit"], 1, 1e9):
                raise Refused("repeat.limit: not a whole number of runs")
            if get(repeat, "until") is not MISSING:
                self.date("repeat.until", repeat["until"])
        if misfire is not MISSING:
            policy = get(misfire, "policy") if is_object(misfire) else misfire
            if is_object(misfire):
                self.only("misfire", misfire, ["policy", "grace"])
                if get(misfire, "grace") is not MISSING:
                    self.duration("misfire.grace", misfire["grace"])
            if not isinstance(policy, str) or policy not in RULES["misfire_policies"]:
                raise Refused("misfire: unknown policy")
        overlap = get(doc, "overlap")
        if overlap is not MISSING and (
            not isinstance(overlap, str) or overlap not in RULES["overlap_policies"]
        ):
            raise Refused("overlap: unknown policy")
        if retry is not MISSING:
            if not is_object(retry):
                raise Refused("retry: not an object")
            self.only("retry", retry, ["limit", "delay", "backoff", "max_delay", "jitter"])
            if not is_count(get(retry, "limit"), 0, 1000):
                raise Refused("retry.limit: not 0 to 1000")
            for name in ("delay", "max_delay"):
                if get(retry, name) is not MISSING:
                    self.duration(f"retry.{name}", retry[name])
            backoff = get(retry, "backoff")
            if backoff is not MISSING and (
                isinstance(backoff, bool) or not isinstance(backoff, int | float) or backoff < 1
            ):
                raise Refused("retry.backoff: not a number >= 1")
            if get(retry, "jitter") is not MISSING and not isinstance(retry["jitter"], bool):
                raise Refused("retry.jitter: not a boolean")
        if get(doc, "timeout") is not MISSING:
            self.duration("timeout", doc["timeout"])

    def task(self, doc: dict[str, Any]) -> None:
        """The shape of a task, whoever writes it."""
        worker = get(doc, "worker")
        if not isinstance(worker, str) or not PATTERNS["worker"].match(worker):
            raise Refused("worker: not a worker name")
        if not reads_back_as_itself(worker):
            raise Refused("worker: reads as another value in a query string")
        self.date("date", get(doc, "date"))
        job = get(doc, "job")
        if not is_object(job):
            raise Refused("job: not an object")
        name = get(job, "name")
        if not isinstance(name, str) or not PATTERNS["job_name"].match(name):
            raise Refused("job.name: not a job module name")
        if name.startswith("__"):
            raise Refused("job.name: starts with __")
        if get(job, "arguments") is not MISSING and not isinstance(job["arguments"], list):
            raise Refused("job.arguments: not an array")
        for name, kind in RULES["worker_field_types"].items():
            if get(doc, name) is not MISSING and not has_shape(doc[name], kind):
                raise Refused(f"{name}: not the shape the worker writes")
        if deeper_than(get(job, "arguments"), RULES["max_depth"]):
            raise Refused("job.arguments: nested too deep")
        self.schedule(doc)
        status = get(doc, "status")
        if not isinstance(status, str) or status not in STATUSES:
            raise Refused("status: unknown")

    def record(self, doc: dict[str, Any]) -> None:
        name, instance = get(doc, "name"), get(doc, "instance")
        if not isinstance(name, str) or not PATTERNS["worker"].match(name):
            raise Refused("name: not a worker name")
        if not isinstance(instance, str) or not instance.startswith(name + "@"):
            raise Refused("instance: does not start with the name")
        if doc.get("_id") != PREFIX + instance:
            raise Refused("_id: not the record's")
        if get(doc, "lease_until") is not MISSING:
            self.date("lease_until", doc["lease_until"])

    @staticmethod
    def is_task(doc: dict[str, Any]) -> bool:
        return get(doc, "type") is MISSING or get(doc, "type") == "task"

    @staticmethod
    def is_record(doc: dict[str, Any]) -> bool:
        return get(doc, "type") == "worker"

    @staticmethod
    def known(doc: dict[str, Any]) -> bool:
        status = get(doc, "status")
        return isinstance(status, str) and status in STATUSES

    def write(self, new: dict[str, Any], old: dict[str, Any] | None, role: str) -> None:
        """Raise Refused unless `role` may write `new` over `old` (None: a new document).

        role: "admin" (a server admin), "client", "worker", or "none" (neither role)."""
        admin = role == "admin"

        def has(who: str) -> bool:
            return admin or role == who

        def writer() -> None:
            if not (has("client") or has("worker")):
                raise Refused("role: neither a client nor a worker")

        def worker_fields(before: dict[str, Any]) -> None:
            if has("worker"):
                return
            for name in WORKER_FIELDS:
                if js_json(get(new, name)) != js_json(get(before, name)):
                    raise Refused(f"{name}: only workers write it")

        if new.get("_deleted") is True:
            if old is not None and self.is_record(old) and not has("worker"):
                raise Refused("type: only workers delete worker records")
            if get(new, "resolves_conflict") is True and has("worker"):
                return
            if old is None or self.is_task(old):
                writer()
            if (
                old is not None
                and self.is_task(old)
                and self.known(old)
                and old["status"] not in DELETABLE
            ):
                raise Refused(f"status: a {old['status']} task cannot be deleted")
            return
        if self.is_record(new):
            if old is not None and not self.is_record(old):
                raise Refused("type: a task cannot become a worker record")
            if not has("worker"):
                raise Refused("type: only workers write worker records")
            self.record(new)
            return
        if not self.is_task(new):
            raise Refused("type: unknown document type")
        if old is not None and not self.is_task(old):
            raise Refused("type: a record cannot become a task")
        writer()
        self.task(new)
        if not admin and js_json(get(new, FORCE)) != js_json(get(old or {}, FORCE)):
            raise Refused(f"{FORCE}: only server admins")
        if old is None or not self.known(old):
            if new["status"] != INITIAL:
                raise Refused("status: a new task must start as waiting")
            worker_fields(old or {})
            return
        source, target = old["status"], new["status"]
        if source in FINAL:
            if admin and get(new, FORCE) is True:
                return
            if (
                has("worker")
                and self.same_except(new, old, ("_rev", "_revisions", "conflicts_resolved"))
                and js_json(get(new, "conflicts_resolved"))
                != js_json(get(old, "conflicts_resolved"))
            ):
                return  # a worker records the conflicting revisions it resolved
            raise Refused(f"status: {source} is final")
        if source != target and target not in TRANSITIONS[source]:
            raise Refused(f"status: no move from {source} to {target}")
        if source != target and not has(TRANSITIONS[source][target]):
            raise Refused(f"status: only {TRANSITIONS[source][target]}s move {source}->{target}")
        worker_fields(old)
        if source != INITIAL and (
            get(new, "worker") != get(old, "worker")
            or js_json(get(new, "job")) != js_json(get(old, "job"))
        ):
            raise Refused("worker, job: change only while waiting")
        if (
            get(new, "date") != get(old, "date")
            and source not in (INITIAL, "reschedule")
            and target not in ("reschedule", INITIAL)
        ):
            raise Refused("date: a held task keeps its date")

    @staticmethod
    def same_except(new: dict[str, Any], old: dict[str, Any], ignored: tuple[str, ...]) -> bool:
        return all(
            js_json(get(new, key)) == js_json(get(old, key))
            for key in {*new, *old}
            if key not in ignored
        )

    def judge(self, new: dict[str, Any], old: dict[str, Any] | None, role: str) -> Judgement:
        self.unsure = []
        if EMBEDDED:  # PouchDB Server drops a "__proto__" field before it validates
            new = {key: value for key, value in new.items() if key != "__proto__"}
        try:
            self.write(new, old, role)
        except Refused as refusal:
            return Judgement("refuse", str(refusal))
        if self.unsure:
            return Judgement("either", unsure=list(self.unsure))
        return Judgement("accept")

    def stored_problem(self, doc: dict[str, Any]) -> str | None:
        """Why a stored (not deleted) document is not a valid task or worker record, or None."""
        self.unsure = []
        try:
            if self.is_record(doc):
                self.record(doc)
            elif not self.is_task(doc):
                raise Refused("type: unknown document type")
            else:
                self.task(doc)
        except Refused as refusal:
            return str(refusal)
        return None


ORACLE = Oracle()


# -- what is generated -------------------------------------------------------------------------


@dataclass(frozen=True)
class Big:
    """A huge string, drawn as its size only (hypothesis prints the draw, not the string)."""

    size: int
    char: str

    def value(self) -> str:
        escaped = len(json.dumps(self.char)) - 2  # as sent: "\u0000" is 6 bytes
        return self.char * max(1, self.size // escaped)


@dataclass(frozen=True)
class Deep:
    """Arguments nested `depth` levels deep, in lists or objects."""

    depth: int
    kind: str

    def value(self) -> Any:
        inner: Any = "bottom"
        for level in range(self.depth):
            inner = [inner] if self.kind == "list" or level % 2 else {"k": inner}
        return inner


def materialize(value: Any) -> Any:
    """The document as sent: Big and Deep placeholders expanded (one JSON round trip)."""

    def expand(placeholder: object) -> Any:
        if isinstance(placeholder, Big | Deep):
            return placeholder.value()
        raise TypeError(type(placeholder).__name__)

    text = json.dumps(value, default=expand, allow_nan=False)
    assert len(text) < 1_000_000, "every document stays under 1 MB"
    return json.loads(text)


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    return st.one_of(*[strategy for weight, strategy in choices for _ in range(weight)])


# The outcome of a write Apache CouchDB refuses whatever the rules say: not valid UTF-8
# JSON, or a top-level `_` field it does not know.
NOT_A_DOCUMENT = "refused: not a document"
# The top-level fields starting with `_` that CouchDB knows in a document sent to it.
SPECIAL = {"_id", "_rev", "_deleted", "_attachments", "_revisions", "_conflicts", "_local_seq"}

EDGE_STRINGS = [
    "",
    "\x00",
    "a\x00b",
    "\u0301",  # a lone combining mark
    "e\u0301\u0301\u0301",
    "\u202e\u202d\u200f",  # right-to-left and left-to-right overrides
    "مرحبا بالعالم",
    "שלום",
    "\U0001f600",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # a family: emoji joined by zero-width joiners
    "\u200b\u200c\u200d\u2060",  # zero-width characters
    "\ufeff",
    "\ud800",  # a lone surrogate: JSON can carry it escaped
    "\udfff\ud800",
    "\uffff\U0010ffff",
    "\u2028\u2029",
    "'; DROP TABLE tasks; --",
    "${jndi:ldap://x}",
    "../../etc/passwd",
    "__proto__",
    "constructor",
    "toString",
]
edge_text = weighted((3, st.sampled_from(EDGE_STRINGS)), (2, st.text(max_size=12)))
integers = weighted(
    (3, st.integers(-1000, 1000)),
    (1, st.integers(-(2**64), 2**64)),
    (1, st.sampled_from([0, -1, 2**53, 2**53 + 1, -(2**53) - 1, 10**20, 10**21])),
)
floats = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = st.one_of(st.none(), st.booleans(), integers, floats, edge_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(edge_text, inner, max_size=3),
    max_leaves=6,
)
junk = weighted(
    (3, json_scalars),
    (1, st.lists(json_scalars, max_size=2)),
    (1, st.dictionaries(edge_text, json_scalars, max_size=2)),
)

VALID_WORKERS = [FUZZ_WORKER, "other", "w.1", "A-b_c", "1", "1.5", "0.1", "true", "null", "z" * 64]
NEAR_WORKERS = [
    "",
    "-x",
    ".x",
    "_x",
    "z" * 65,
    "1.0",
    "1e5",
    "1.50",
    "1E-7",
    "12345678901234567890",
    "fuzz\n",
    "fuzz ",
    " fuzz",
    "fu zz",
    "fu\u200bzz",
    "\uff46uzz",  # a fullwidth letter
    "fu/zz",
    "fuzz@host",
    "fü",
]
workers = weighted(
    (12, st.just(FUZZ_WORKER)),
    (3, st.sampled_from(VALID_WORKERS)),
    (2, st.sampled_from(NEAR_WORKERS)),
    (1, junk),
)

two = st.integers(0, 99).map("{:02d}".format)
digits = st.integers(1, 6).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n))
offsets = st.one_of(
    st.just("Z"),
    st.just(""),
    st.builds(
        lambda s, h, m: f"{s}{h:02d}:{m:02d}",
        st.sampled_from("+-"),
        st.integers(0, 23),
        st.integers(0, 59),
    ),
)


@st.composite
def valid_dates(draw: st.DrawFn, years: st.SearchStrategy[int]) -> str:
    year, month = draw(years), draw(st.integers(1, 12))
    day = draw(st.integers(1, ORACLE.days_in_month(year, month)))
    text = f"{year:04d}-{month:02d}-{day:02d}"
    if draw(st.booleans()):
        text += draw(st.sampled_from("T ")) + f"{draw(st.integers(0, 23)):02d}:"
        text += f"{draw(st.integers(0, 59)):02d}"
        if draw(st.booleans()):
            text += f":{draw(st.integers(0, 59)):02d}"
            if draw(st.booleans()):
                text += "." + draw(digits)
        text += draw(offsets)
    return text


future_years = st.integers(2900, 9998)
past_years = weighted((4, st.integers(1971, 2020)), (1, st.integers(1, 1970)))
NEAR_DATES = [
    "2011-02-29",
    "2011-02-30",
    "2100-02-29",
    "2011-04-31",
    "2011-13-01",
    "2011-00-10",
    "2011-10-00",
    "2011-10-32",
    "2011-10-12T24:00",
    "2011-10-12T23:60",
    "2011-10-12T23:59:60",
    "2011-10-12T10:00:00+24:00",
    "2011-10-12T10:00:00+12:60",
    "2011-10-12T10:00:00+0200",
    "2011-10-12T10:00:00+02",
    "2011-10-12T10:00:00.1234567Z",
    "2011-10-12T10:00:00.Z",
    "2011-10-12t10:00:00z",
    "2011-10-12T10:00:00z",
    "2011-10-12T10",
    "2011-10-12T",
    "2011-1-5",
    "11-10-12",
    "12011-10-12",
    "-2011-10-12",
    "+2011-10-12",
    "2011/10/12",
    "20111012",
    "2011-10-12\n",
    " 2011-10-12",
    "2011-10-12Z",
    "\uff12\uff10\uff11\uff11-10-12",  # fullwidth digits
    "\u0662\u0660\u0661\u0661-\u0661\u0660-\u0661\u0662",  # Arabic-Indic digits
    "2011-10-12T10:00:00Z ",
    "2011-10-12T10:00:00\u200bZ",
    "now",
    "",
    "0000-02-29",  # see Oracle.date
]
dates = weighted(
    (6, valid_dates(future_years)),
    (2, st.sampled_from(NEAR_DATES)),
    (1, valid_dates(st.integers(0, 9999))),
    (1, junk),
)
due_dates = weighted(
    (6, valid_dates(past_years)),
    (1, st.sampled_from(["0000-01-01", "0001-01-01T00:00:00+23:59", "1970-01-01"])),
)

JOB_NAMES = ["noop"] * 6 + ["echo", "_private", "j" * 64, "missing_job", "Noop", "noop2"]
NEAR_JOB_NAMES = [
    "",
    "__init__",
    "__noop",
    "1noop",
    "no-op",
    "no.op",
    "../noop",
    "os.system",
    "noop\n",
    "nöop",
    "j" * 65,
    "no op",
]
big_strings = st.builds(
    Big,
    weighted((4, st.integers(1, 20_000)), (1, st.integers(20_000, MAX_BIG))),
    st.sampled_from(["x", "\x00", "é", "\U0001f600", "\u0301", "\u202e"]),
)
deep_values = st.builds(Deep, st.integers(2, MAX_DEPTH), st.sampled_from(["list", "object"]))
arguments = weighted(
    (8, st.lists(json_values, max_size=4)),
    (4, st.lists(edge_text, min_size=1, max_size=3)),
    (1, st.lists(big_strings, min_size=1, max_size=1)),
    (1, st.lists(deep_values, min_size=1, max_size=1)),
)
jobs = st.one_of(
    st.builds(
        lambda name, args: {"name": name, "arguments": args}, st.sampled_from(JOB_NAMES), arguments
    ),
    st.builds(lambda name: {"name": name}, st.sampled_from(JOB_NAMES)),
)
near_jobs = st.one_of(
    st.builds(
        lambda name, args: {"name": name, "arguments": args},
        weighted((3, st.sampled_from(NEAR_JOB_NAMES)), (1, junk)),
        arguments,
    ),
    st.builds(
        lambda name, args: {"name": name, "arguments": args},
        st.sampled_from(JOB_NAMES),
        st.one_of(json_scalars, st.dictionaries(edge_text, json_scalars, max_size=2)),
    ),
    st.builds(lambda args: {"arguments": args}, arguments),
    st.builds(
        lambda name, extra: {"name": name, **extra},
        st.sampled_from(JOB_NAMES),
        st.dictionaries(edge_text, json_scalars, min_size=1, max_size=2),
    ),
    junk,
)

CRONS = [
    "*/5 * * * *",
    "30 2 * * *",
    "0 0 1 1 *",
    "*/10 * * * * *",
    "0 9 * * MON-FRI",
    "0 0 L * *",
    "0 0 ? * 1#2",
    "15W * * * *",
]
NEAR_CRONS = [
    "* * * *",
    "* * * * * * *",
    "",
    "   ",
    "@reboot",
    "* * * * %",
    "*\u00a0* * * *",
    "*\u3000*\u3000*\u3000*\u3000*",
    "* * * * *\n",
    "\ufeff* * * * *",
    "* * * * ü",
    "*\x1c* * * *",
    " */5  *  * * * ",
]
durations = st.sampled_from(["PT30S", "PT1H", "P1D", "P1M", "PT0.5S", "P1W", "P1Y2M3DT4H5M6S"])
NEAR_DURATIONS = [
    "P",
    "PT",
    "P1DT",
    "PT1H2",
    "1H",
    "pt1h",
    "PT-1S",
    "PT1,5S",
    "P1.S",
    "PT1S ",
    "PT1S\n",
    "PT1h",
    "",
    "P1D1M",
]
near_durations = weighted((3, st.sampled_from(NEAR_DURATIONS)), (1, junk))
TIMEZONES = ["UTC", "Europe/Paris", "America/Argentina/Buenos_Aires", "Etc/GMT+5", "Nowhere/Land"]
NEAR_TIMEZONES = ["", "Europe/", "/Paris", "Europe//Paris", "a/b/c/d", "Europe/Paris\n", "utc 1"]

repeat_options = {
    "timezone": st.sampled_from(TIMEZONES),
    "limit": st.integers(1, 3),
    "until": valid_dates(st.integers(2000, 9998)),
}
repeats = st.one_of(
    st.fixed_dictionaries(
        {"cron": weighted((5, st.sampled_from(CRONS)), (1, st.sampled_from(CRON_NICKNAMES)))},
        optional=repeat_options,
    ),
    st.fixed_dictionaries({"interval": durations}, optional=repeat_options),
)
near_repeats = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "cron": weighted((3, st.sampled_from(NEAR_CRONS + CRONS)), (1, junk)),
            "interval": weighted((2, near_durations), (1, durations)),
            "timezone": weighted((2, st.sampled_from(NEAR_TIMEZONES)), (1, junk)),
            "limit": st.sampled_from([0, -1, 1.5, 1e9, 1e9 + 1, True, "3", None, 2**60]),
            "until": weighted((2, st.sampled_from(NEAR_DATES)), (1, junk)),
            # hasOwnProperty is left out: see test_a_schedule_field_named_hasOwnProperty_*
            "every": junk,
            "__proto__": junk,
            "Cron": st.sampled_from(CRONS),
        },
    ),
    junk,
)
misfires = st.one_of(
    st.sampled_from(RULES["misfire_policies"]),
    st.fixed_dictionaries(
        {"policy": st.sampled_from(RULES["misfire_policies"])}, optional={"grace": durations}
    ),
)
near_misfires = st.one_of(
    st.sampled_from(["Skip", "", "none", "once ", None, 1]),
    st.fixed_dictionaries(
        {},
        optional={
            "policy": weighted((2, st.sampled_from(RULES["misfire_policies"])), (1, junk)),
            "grace": near_durations,
            "extra": junk,
        },
    ),
)
retries = st.fixed_dictionaries(
    {"limit": st.integers(0, 3)},
    optional={
        "delay": durations,
        "backoff": st.sampled_from([1, 1.5, 2.0, 10]),
        "max_delay": durations,
        "jitter": st.booleans(),
    },
)
near_retries = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "limit": st.sampled_from([-1, 1001, 1.5, "3", None, True, 1000, 0]),
            "delay": near_durations,
            "backoff": st.sampled_from([0, 0.99, -1, "2", None, True, 1e308]),
            "max_delay": near_durations,
            "jitter": st.sampled_from([0, 1, "true", None]),
            "tries": junk,
        },
    ),
    junk,
)

STATUS_VALUES = [*STATUSES, "Waiting", "waiting ", "", "new", "deleted", "constructor"]
statuses = weighted((3, st.sampled_from(STATUS_VALUES)), (1, junk))
TYPES = ["task", "worker", "Task", "", "record", "user", "design"]
types = weighted((3, st.sampled_from(TYPES)), (1, junk))
FOREIGN = [
    "note",
    "priority",
    "tags",
    "__proto__",
    "constructor",  # not "hasOwnProperty": see test_a_field_named_hasOwnProperty_*
    "toString",
    "valueOf",
    "x-y",
    "ключ",
    "\x00",
    "",
    " ",
    "\U0001f600",
    "spawned_by",
    "resolves_conflict",
    "Status",
    "WORKER",
]
foreign = st.dictionaries(st.sampled_from(FOREIGN), json_values, min_size=1, max_size=2)
worker_fields = st.dictionaries(st.sampled_from(WORKER_FIELDS), json_values, min_size=1, max_size=2)


@st.composite
def valid_tasks(draw: st.DrawFn) -> dict[str, Any]:
    worker = draw(weighted((5, st.just(FUZZ_WORKER)), (1, st.sampled_from(VALID_WORKERS))))
    due = worker == FUZZ_WORKER and draw(st.integers(0, 49)) == 0  # the worker runs these
    doc: dict[str, Any] = {
        "worker": worker,
        "date": draw(due_dates if due else valid_dates(future_years)),
        "job": draw(jobs),
        "status": INITIAL,
    }
    optional = {
        "type": st.just("task"),
        "repeat": repeats,
        "misfire": misfires,
        "overlap": st.sampled_from(RULES["overlap_policies"]),
        "retry": retries,
        "timeout": durations,
    }
    chosen = draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True))
    for name in chosen:
        doc[name] = draw(optional[name])
    if due and "repeat" in doc:
        doc["repeat"]["limit"] = 2  # a due series runs twice, not every second until the end
    return doc


FIELD_MUTATIONS: dict[str, st.SearchStrategy] = {
    "worker": workers,
    "date": dates,
    "job": near_jobs,
    "status": statuses,
    "type": types,
    "repeat": near_repeats,
    "misfire": near_misfires,
    "overlap": st.sampled_from(["Skip", "", "queue", None, 0]),
    "retry": near_retries,
    "timeout": near_durations,
    FORCE: st.sampled_from([True, False, "true", 1, None]),
}


@st.composite
def near_miss_tasks(draw: st.DrawFn) -> dict[str, Any]:
    """A valid task with one to three fields dropped, broken or added."""
    doc = draw(valid_tasks())
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["drop", "set", "set", "set", "foreign", "worker_field"]))
        if how == "drop":
            doc.pop(draw(st.sampled_from(["worker", "date", "job", "status"])), None)
        elif how == "set":
            name = draw(st.sampled_from(sorted(FIELD_MUTATIONS)))
            doc[name] = draw(FIELD_MUTATIONS[name])
        elif how == "foreign":
            doc.update(draw(foreign))
        else:
            doc.update(draw(worker_fields))
    return doc


random_docs = st.dictionaries(
    weighted(
        (2, st.sampled_from(["worker", "date", "job", "status", "type", "name"])),
        (1, edge_text.map(lambda key: key.lstrip("_"))),  # no _fields: CouchDB's own
    ),
    json_values,
    max_size=6,
)


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(weighted((3, st.sampled_from(VALID_WORKERS)), (1, st.sampled_from(NEAR_WORKERS))))
    instance = f"{name}@{draw(st.sampled_from(['host', 'h', '']))}:{draw(st.integers(1, 99))}"
    doc: dict[str, Any] = {
        "_id": PREFIX + instance,
        "type": "worker",
        "name": name,
        "instance": instance,
        "state": draw(st.sampled_from(["running", "stopped", "lost", "???"])),
    }
    if draw(st.booleans()):
        doc["lease_until"] = draw(
            weighted((3, valid_dates(st.integers(2000, 9998))), (1, st.sampled_from(NEAR_DATES)))
        )
    if draw(st.integers(0, 3)) == 0:
        how = draw(st.sampled_from(["name", "instance", "_id", "type"]))
        values = ["other", "fuzz@", PREFIX + "x@y", "task"]  # an _id is a non-empty string
        doc[how] = draw(st.sampled_from(values if how == "_id" else ["", None, *values]))
    return doc


ROLES = [*["client"] * 3, *["worker"] * 3, "anonymous", "plain", "admin"]
new_documents = weighted(
    (3, valid_tasks()),
    (6, near_miss_tasks()),
    (1, random_docs),
    (1, records()),
)


any_index = st.integers(0, 2**31 - 1)  # taken modulo what there is to choose from
edits = st.one_of(
    st.sampled_from(sorted(FIELD_MUTATIONS)).flatmap(
        lambda name: FIELD_MUTATIONS[name].map(lambda value: ("set", name, value))
    ),
    any_index.map(lambda index: ("drop", index, None)),
    foreign.map(lambda fields: ("add", "", fields)),
    worker_fields.map(lambda fields: ("add", "", fields)),
)
CHANGE_PARTS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "move": st.fixed_dictionaries(
        {"pick": any_index, "by_the_table": st.integers(0, 9).map(lambda n: n < 7)},
        optional={"date": valid_dates(future_years), "owner": st.integers(0, 9)},
    ),
    "status": st.fixed_dictionaries({"status": statuses}),
    "edit": st.fixed_dictionaries(
        {"edits": st.lists(edits, min_size=1, max_size=2)},
        optional={"status": st.sampled_from(STATUSES)},
    ),
    "steer": st.one_of(
        valid_dates(future_years).map(lambda value: {"field": "date", "value": value}),
        workers.map(lambda value: {"field": "worker", "value": value}),
        jobs.map(lambda value: {"field": "job", "value": value}),
    ),
    "echo": st.just({}),
    "delete": st.fixed_dictionaries(
        {"whole": st.booleans(), "resolves": st.integers(0, 9).map(lambda n: n == 0)}
    ),
    "stale": st.fixed_dictionaries(
        {"rev": st.sampled_from(["none", "made-up", "first"]), "status": st.sampled_from(STATUSES)}
    ),
}


# A change to a stored document, drawn without looking at it (the draws may not depend on
# what the server holds, or hypothesis sees a flaky strategy), applied to it by apply_change.
changes = st.tuples(
    weighted(
        (6, st.just("move")),
        (2, st.just("status")),
        (4, st.just("edit")),
        (2, st.just("steer")),
        (1, st.just("echo")),
        (2, st.just("delete")),
        (1, st.just("stale")),
    ),
    st.sampled_from(ROLES),
).flatmap(
    lambda kind_sender: CHANGE_PARTS[kind_sender[0]].map(
        lambda parts: {"kind": kind_sender[0], "sender": kind_sender[1], **parts}
    )
)


def apply_change(change: dict[str, Any], current: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(sender, body): the drawn change applied to the stored document."""
    body, sender, kind = copy.deepcopy(current), change["sender"], change["kind"]
    status = current.get("status")
    if kind == "move" and isinstance(status, str) and TRANSITIONS.get(status):
        targets = sorted(TRANSITIONS[status])
        target = targets[change["pick"] % len(targets)]
        body["status"] = target
        if change["by_the_table"]:
            sender = TRANSITIONS[status][target]
        if target == "reschedule" and "date" in change:
            body["date"] = change["date"]
        if "owner" in change and target in ("scheduled", "running"):
            body["owner"] = f"{current.get('worker')}@fuzzer:1:{change['owner']}"
    elif kind == "move":  # a record, or a final task: nothing to move to
        body["status"] = STATUSES[change["pick"] % len(STATUSES)]
    elif kind == "edit":
        for how, name, value in change["edits"]:
            if how == "set":
                body[name] = value
            elif how == "drop":
                fields = sorted(key for key in body if not key.startswith("_"))
                if fields:
                    body.pop(fields[name % len(fields)])
            else:
                body.update(value)
        if "status" in change:
            body["status"] = change["status"]
    elif kind == "status":
        body["status"] = change["status"]
    elif kind == "steer":
        body[change["field"]] = change["value"]
    elif kind == "delete":
        if not change["whole"]:
            body = {"_id": current["_id"], "_rev": current["_rev"]}
        body["_deleted"] = True
        if change["resolves"]:
            body["resolves_conflict"] = True
    elif kind == "stale":
        if change["rev"] == "none":
            body.pop("_rev")
        elif change["rev"] == "made-up":
            body["_rev"] = f"{int(current['_rev'].split('-')[0]) + 1}-{uuid.uuid4().hex}"
        else:
            body["_rev"] = f"1-{'0' * 32}"
        body["status"] = change["status"]
    return sender, body


# -- sending, judging, checking ------------------------------------------------------------------


@dataclass
class Sent:
    sender: str
    role: str  # the sender as the oracle sees it: admin, client, worker or none
    kind: str
    body: dict[str, Any]  # exactly what was sent
    old: dict[str, Any] | None  # the stored version when it was sent
    judgement: Judgement
    outcome: str = ""  # accepted, refused or conflict
    rev: str | None = None
    reason: str = ""

    def detail(self) -> str:
        return (
            f"{self.kind} as {self.sender} ({self.role})\nsent: {brief(self.body)}\n"
            f"stored before: {brief(self.old)}\noracle: {self.judgement}\n"
            f"server: {self.outcome} {self.reason}"
        )


def without_proto(value: Any) -> Any:
    """PouchDB Server drops every "__proto__" key, at any depth, when it stores a document."""
    if isinstance(value, list):
        return [without_proto(item) for item in value]
    if isinstance(value, dict):
        return {k: without_proto(v) for k, v in value.items() if k != "__proto__"}
    return value


class Lazy:
    """A failure message written only when it is shown."""

    def __init__(self, text: Callable[[], str]) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text()


def comparable(doc: dict[str, Any]) -> str:
    """A document's content, to compare what was sent with what is stored."""
    content = {k: v for k, v in doc.items() if k != "_rev"}
    return json.dumps(_js_normal(without_proto(content)), sort_keys=True)


def brief(doc: Any, limit: int = 700) -> str:
    text = json.dumps(doc, ensure_ascii=True)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def worker_state_problem(doc: dict[str, Any]) -> str | None:
    """What is inconsistent in a task whose last revision the worker wrote, or None."""
    status, owner = doc.get("status"), doc.get("owner")
    if doc.get("worker") != FUZZ_WORKER:
        return f"the worker {FUZZ_WORKER} wrote a task of {doc.get('worker')!r}"
    if status in ("scheduled", "running") and not (
        isinstance(owner, str) and owner.startswith(FUZZ_WORKER + "@")
    ):
        return f"{status} without an owner of {FUZZ_WORKER}"
    if status in ("done", "err") and "finished_at" not in doc:
        return f"{status} without finished_at"
    if status == "err" and not isinstance(doc.get("error"), dict):
        return "err without an error"
    if status == "canceled" and "canceled_at" not in doc and "finished_at" not in doc:
        return "canceled without canceled_at (or finished_at, canceled while it ran)"
    return None


def readable_by_the_worker(value: Any) -> bool:
    """Whether the worker's own date parser reads `value` (see test_a_worker_copes_with_dates_*)."""
    try:
        tasks.parse_date(value) - timedelta(seconds=1)  # the worker starts jobs a bit early
    except (ValueError, OverflowError, TypeError, AttributeError):
        return False
    return True


def valid_date(value: Any) -> bool:
    try:
        ORACLE.date("date", value)
    except Refused:
        return False
    return True


def plausible(name: str, value: Any) -> bool:
    """Whether a worker-owned field has a shape the worker itself writes (see
    test_junk_in_worker_owned_fields_*)."""
    if name == "owner":
        return value is None or isinstance(value, str)
    if name in ("attempt", "runs", "skipped"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if name in ("takeovers", "history", "conflicts_resolved"):
        return isinstance(value, list) and all(isinstance(entry, dict) for entry in value)
    if name in ("anchor", "occurrence"):
        return not value or readable_by_the_worker(value)
    return True


class Fuzz:
    """The state of the whole run: who sends, what is stored, the counts."""

    def __init__(
        self, admin: Database, senders: dict[str, Database], roles: dict[str, str]
    ) -> None:
        self.admin = admin
        self.senders = senders
        self.roles = roles
        self.pool: list[str] = []  # ids of stored documents, for updates
        self.pooled: set[str] = set()
        self.ours: dict[str, str] = {}  # id -> the revision of our last accepted write
        self.counts: Counter[str] = Counter()
        self.unsure: Counter[str] = Counter()
        self.moves: Counter[str] = Counter()  # accepted status changes, by role

    def current(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        rows = self.admin.all_docs(keys=ids, include_docs=True)["rows"]
        return {row["key"]: row["doc"] for row in rows if row.get("doc")}

    # -- one round: a hypothesis example ------------------------------------------------------
    def round(self, data: st.DataObject) -> None:
        drawn = data.draw(
            st.lists(
                st.tuples(st.sampled_from(ROLES), new_documents),
                min_size=CREATES,
                max_size=CREATES,
            ),
            label="new documents",
        )
        creates: dict[str, tuple[str, dict[str, Any]]] = {}
        for sender, doc in drawn:
            body = materialize(doc)
            body.setdefault("_id", uuid.uuid4().hex)
            if isinstance(body.get("_id"), str) and body["_id"] not in creates:
                creates[body["_id"]] = (sender, body)
        picks = data.draw(
            st.lists(any_index, min_size=UPDATES, max_size=UPDATES), label="documents to update"
        )
        drawn_changes = data.draw(
            st.lists(changes, min_size=UPDATES, max_size=UPDATES), label="their changes"
        )
        picked: dict[str, dict[str, Any]] = {}
        for pick, change in zip(picks, drawn_changes, strict=True):
            doc_id = self.pool[pick % len(self.pool)] if self.pool else None
            if doc_id is not None and doc_id not in creates and doc_id not in picked:
                picked[doc_id] = change
        stored = self.current([*creates, *picked])
        batch: list[Sent] = []
        for doc_id, (sender, body) in creates.items():
            batch.append(self.sent(sender, "new", self.for_the_worker(body), stored.get(doc_id)))
        for doc_id, change in picked.items():
            if doc_id not in stored:
                self.counts["skipped: deleted"] += 1
                continue
            sender, body = apply_change(change, stored[doc_id])
            body = self.for_the_worker(materialize(body), stored[doc_id])
            batch.append(self.sent(sender, change["kind"], body, stored[doc_id]))
        self.send(batch)
        self.judge(batch)
        self.check_stored(batch)

    def for_the_worker(
        self, body: dict[str, Any], old: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Steer the documents the worker "fuzz" would read around its known bugs (each has a
        strict xfail test below): a date it cannot read goes to another worker, a worker-owned
        field of a shape the worker never writes is left out, and a task it may be claiming
        right now is not given to another worker."""
        if (
            old is not None
            and old.get("worker") == FUZZ_WORKER
            and body.get("worker") != FUZZ_WORKER
            and readable_by_the_worker(old.get("date"))
            and tasks.parse_date(old["date"]) < tasks.now() + timedelta(days=1)
        ):
            self.counts["kept with the worker: a due task it may be claiming"] += 1
            body["worker"] = FUZZ_WORKER
        if body.get("worker") != FUZZ_WORKER or Oracle.is_record(body):
            return body
        date = body.get("date")
        if valid_date(date) and not readable_by_the_worker(date):
            self.counts["diverted: a date the worker cannot read"] += 1
            body["worker"] = "other"
            return body
        for name in WORKER_FIELDS:
            if name in body and not plausible(name, body[name]):
                self.counts["left out: a worker field the worker never writes so"] += 1
                del body[name]
        return body

    def sent(
        self, sender: str, kind: str, body: dict[str, Any], old: dict[str, Any] | None
    ) -> Sent:
        role = self.roles[sender]
        return Sent(sender, role, kind, body, old, ORACLE.judge(body, old, role))

    # -- one request per sender -------------------------------------------------------------------
    def send(self, batch: list[Sent]) -> None:
        by_sender: dict[str, list[Sent]] = {}
        for item in batch:
            by_sender.setdefault(item.sender, []).append(item)
        for sender, items in by_sender.items():
            docs = [item.body for item in items]
            self.counts["sent"] += len(docs)
            self.counts[f"sent as {sender}"] += len(docs)
            database = self.senders[sender]
            try:
                # As any HTTP client may send it (After's own refuse a lone surrogate before
                # sending): Apache CouchDB refuses such a request as a whole, and the split
                # in bulk_docs gives each document its own row.
                rows = database.bulk_docs(docs, encode=lambda doc: json.dumps(doc).encode())
            except CouchError as refusal:
                assert refusal.status in (401, 403), (
                    f"_bulk_docs as {sender}: {refusal}\nfirst document: {brief(docs[0])}"
                )
                assert self.roles[sender] == "none", f"{sender}'s request refused: {refusal}"
                assert refusal.reason.strip(), f"a refusal without a reason: {refusal}"
                for item in items:
                    item.outcome, item.reason = "refused", f"{refusal.status} {refusal.reason}"
                continue
            for item, row in zip(items, rows, strict=True):
                self.take(item, row)
        for item in batch:
            self.counts[item.outcome] += 1
            self.counts[f"{item.outcome} as {item.sender}"] += 1

    def take(self, item: Sent, row: dict[str, Any]) -> None:
        if row.get("ok") is True:
            item.outcome, item.rev = "accepted", row["rev"]
        elif row.get("error") in ("forbidden", "unauthorized"):
            item.outcome = "refused"
            item.reason = f"{row['error']}: {row.get('reason') or ''}"
            assert str(row.get("reason") or "").strip(), f"no reason given:\n{item.detail()}"
            if item.role != "none":
                assert row["error"] == "forbidden", f"401 for a known user:\n{item.detail()}"
        elif row.get("error") == "conflict":
            item.outcome = "conflict"
        elif row.get("error") == "bad_request" and "invalid UTF-8 JSON" in row.get("reason", ""):
            # Apache CouchDB: not valid Unicode, whatever the rules would say
            assert json_problem(item.body), f"refused as not UTF-8:\n{item.detail()}"
            item.outcome, item.reason = NOT_A_DOCUMENT, row["reason"]
        elif row.get("error") == "doc_validation":
            # Apache CouchDB: a top-level `_` field it does not know is no document at all
            # (400 for the request; bulk_docs found this one)
            unknown = [key for key in item.body if key.startswith("_") and key not in SPECIAL]
            assert unknown, f"refused as no document:\n{item.detail()}"
            item.outcome, item.reason = NOT_A_DOCUMENT, row["reason"]
        else:
            item.reason = json.dumps(row)
            pytest.fail(f"neither accepted nor refused nor a conflict:\n{item.detail()}")

    # -- the answers against the oracle ----------------------------------------------------------
    def judge(self, batch: list[Sent]) -> None:
        for item in batch:
            stale = item.body.get("_rev") != (item.old or {}).get("_rev")
            if item.outcome == "conflict":
                assert stale or self.changed_since(item), (
                    f"a conflict for nothing:\n{item.detail()}"
                )
                self.counts[
                    "conflict: stale revision" if stale else "conflict: raced the worker"
                ] += 1
                continue
            if item.outcome == NOT_A_DOCUMENT:  # checked against the body in take()
                continue
            if stale:  # CouchDB may check the rules or the revision first
                assert item.outcome == "refused", f"a stale revision taken:\n{item.detail()}"
                continue
            verdict = item.judgement.verdict
            if verdict == "either":
                for note in item.judgement.unsure:
                    self.unsure[f"{note}: {item.outcome}"] += 1
                continue
            expected = "accepted" if verdict == "accept" else "refused"
            before, after = (item.old or {}).get("status"), item.body.get("status")
            known = item.old is not None and Oracle.is_task(item.old) and after in STATUSES
            if item.outcome == "accepted" and before != after and known:
                self.moves[f"{before}->{after} ({item.role})"] += 1
            if item.outcome == "refused" and expected == "accepted" and self.changed_since(item):
                # The worker wrote first; PouchDB Server judges a write against the current
                # revision before it looks at the one the write names (a 403, not a 409).
                self.counts["refused: raced the worker"] += 1
                continue
            assert item.outcome == expected, f"the server and the oracle disagree:\n{item.detail()}"

    def changed_since(self, item: Sent) -> bool:
        now = self.current([item.body["_id"]]).get(item.body["_id"])
        if item.old is None:
            return now is not None
        return now is None or now["_rev"] != item.old["_rev"]

    # -- what is stored afterwards ---------------------------------------------------------------
    def check_stored(self, batch: list[Sent]) -> None:
        stored = self.current([item.body["_id"] for item in batch])
        for item in batch:
            doc_id = item.body["_id"]
            doc = stored.get(doc_id)
            where = Lazy(lambda item=item, doc=doc: f"{item.detail()}\nstored now: {brief(doc)}")
            if doc is not None:
                problem = ORACLE.stored_problem(doc)
                assert problem is None, f"an invalid document is stored ({problem}):\n{where}"
            if item.outcome == "accepted" and item.body.get("_deleted") is True:
                assert doc is None, f"an accepted delete left the document:\n{where}"
                self.ours.pop(doc_id, None)
                self.unpool(doc_id)
            elif item.outcome == "accepted":
                assert item.rev is not None
                self.ours[doc_id] = item.rev
                self.enpool(doc_id)
                if doc is not None and doc["_rev"] == item.rev:
                    assert comparable(doc) == comparable(item.body), f"stored otherwise:\n{where}"
                else:
                    self.assert_worker_wrote(doc, where)
            elif item.old is None:
                assert doc is None, f"a refused new document is stored:\n{where}"
            elif doc is None or doc["_rev"] != item.old["_rev"]:
                self.assert_worker_wrote(doc, where)

    def enpool(self, doc_id: str) -> None:
        if doc_id not in self.pooled:
            self.pooled.add(doc_id)
            self.pool.append(doc_id)

    def unpool(self, doc_id: str) -> None:
        if doc_id in self.pooled:
            self.pooled.discard(doc_id)
            self.pool.remove(doc_id)

    def assert_worker_wrote(self, doc: dict[str, Any] | None, where: object) -> None:
        """A revision none of our writes made: the worker "fuzz" wrote it, consistently."""
        assert doc is not None, f"deleted by someone else:\n{where}"
        if doc.get("type") == "worker":
            assert doc.get("name") == FUZZ_WORKER, f"a record changed by someone else:\n{where}"
            return
        problem = worker_state_problem(doc)
        assert problem is None, f"the worker left it inconsistent ({problem}):\n{where}"


# -- the run --------------------------------------------------------------------------------------


def moves_to(status: str) -> list[str]:
    """The shortest chain of allowed moves from a new task to `status`."""
    chains: dict[str, list[str]] = {INITIAL: []}
    frontier = [INITIAL]
    while frontier:
        here = frontier.pop(0)
        for there in TRANSITIONS[here]:
            if there not in chains:
                chains[there] = [*chains[here], there]
                frontier.append(there)
    return chains[status]


def seed(database: Database, fuzz: Fuzz) -> None:
    """Tasks in every status, so that updates start from each of them."""
    for status in STATUSES:
        for worker in ("other", "other", FUZZ_WORKER):
            doc = new_task(worker=worker, date="2999-01-01T00:00:00Z", job={"name": "noop"})
            doc["_id"], doc["_rev"] = database.post(doc)
            for step in moves_to(status):
                doc["status"] = step
                database.put(doc)
            fuzz.ours[doc["_id"]] = doc["_rev"]
            fuzz.enpool(doc["_id"])


class Watch(logging.Handler):
    """The errors the worker logs while it runs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def watched() -> Iterator[tuple[Watch, list[threading.ExceptHookArgs]]]:
    """Errors logged by After, and exceptions that ended a thread, during the test."""
    watch, crashes = Watch(), []
    logger = logging.getLogger("after")
    logger.addHandler(watch)
    previous = threading.excepthook
    threading.excepthook = crashes.append
    try:
        yield watch, crashes
    finally:
        threading.excepthook = previous
        logger.removeHandler(watch)


def run_a_normal_task(database: Database, worker: str = FUZZ_WORKER, timeout: float = 20) -> Any:
    """A task due now for `worker`, with the no-op job; its final version (or a timeout)."""
    doc = new_task(
        worker=worker, date="2001-01-01T00:00:00Z", job={"name": "noop", "arguments": [1, 2, 3]}
    )
    doc_id, _ = database.post(doc)
    return wait_for(
        lambda: (d := database.get(doc_id)) and d["status"] in [*FINAL, "err"] and d,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def users(server: Server) -> Iterator[Any]:
    """A client, a worker and a plain user, as tests/test_roles.py creates them."""
    from test_roles import after_users

    with after_users(server) as created:
        yield created


@pytest.fixture
def secured(one_copy_db: Database, users: Any) -> Database:
    """The test database with After's security object: only the two roles and admins,
    and the users of the test let in already (on a cluster, a node learns of a new
    user a moment after it is written). One copy of it: what the oracle judges is
    validate_doc_update, the same on every copy; a cluster's copies that lag store
    stale writes beside the current revision (conflicts the oracle does not model)."""
    db = one_copy_db
    db.set_security(security_object())
    for who in ("client", "worker"):
        wait_for(lambda who=who: allowed_in(users.db(who, db)), timeout=30)
    return db


def allowed_in(db: Database) -> bool:
    try:
        db.info()
    except Forbidden:
        return False
    return True


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "noop.py").write_text("def run(*arguments):\n    return len(arguments)\n")
    return jobs


@pytest.fixture
def as_worker(config: Config, users: Any, jobs_dir: Path) -> Config:
    """The test configuration with the worker user's credentials and the no-op job."""
    name, password = users.credentials["worker"]
    return dataclasses.replace(config, user=name, password=password, jobs=jobs_dir)


# On Apache CouchDB each validated write costs a JavaScript round trip: the rounds alone
# took 113 s there (QuickJS, 2 cores), against the suite's 120 s per test.
@pytest.mark.timeout(300)
def test_fuzzed_documents_and_updates_keep_the_contract(
    server: Server,
    secured: Database,
    users: Any,
    as_worker: Config,
    start_worker: Any,
    watched: tuple[Watch, list[threading.ExceptHookArgs]],
) -> None:
    started = time.monotonic()
    db, (watch, crashes) = secured, watched
    party = admin_party(server.url)
    senders = {
        kind: Server(server.url, users.credentials[kind]).database(db.name)
        for kind in ("client", "worker", "plain")
    }
    senders["anonymous"] = Server(server.url).database(db.name)
    senders["admin"] = db  # the session's own connection: a server admin
    roles = {
        "client": "client",
        "worker": "worker",
        "plain": "none",
        "admin": "admin",
        # PouchDB Server's admin party: an anonymous request is a server admin, and is
        # judged as one; with an admin configured it is anonymous, and refused (401).
        "anonymous": "admin" if party else "none",
    }
    fuzz = Fuzz(db, senders, roles)
    seed(db, fuzz)
    worker = start_worker(FUZZ_WORKER, config_=as_worker)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same documents on every run, in CI too
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking against a live server
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
    )
    @given(data=st.data())
    def rounds(data: st.DataObject) -> None:
        fuzz.round(data)

    rounds()
    fuzzed = time.monotonic()

    # Every document in the database is a valid task or worker record; those we did not
    # write last were written by the worker, consistently.
    everything = db.all_docs(include_docs=True)["rows"]
    for row in everything:
        doc = row["doc"]
        if doc["_id"].startswith("_design/"):
            continue
        problem = ORACLE.stored_problem(doc)
        assert problem is None, f"an invalid document is stored ({problem}): {brief(doc)}"
        if fuzz.ours.get(doc["_id"]) not in (None, doc["_rev"]):
            fuzz.assert_worker_wrote(doc, f"at the end: {brief(doc)}")
            fuzz.counts["written last by the worker"] += 1

    # The worker is alive and well: its threads run, and it still does its work.
    assert worker.ready.is_set() and not worker.finished.is_set()
    assert not crashes, f"a thread died: {crashes[0].exc_type.__name__}: {crashes[0].exc_value}"
    done = run_a_normal_task(db)
    assert done["status"] == "done" and done["result"] == 3, brief(done)

    # A second instance starts on everything the fuzzing left (it reads it all at start-up).
    second = start_worker(FUZZ_WORKER, config_=as_worker)
    assert run_a_normal_task(db)["status"] == "done"

    # Stopped, they hand back all they held: nothing stays claimed by a stopped instance.
    for instance in (worker, second):
        instance.stop()
    assert worker.finished.wait(30) and second.finished.wait(30)
    held = [
        row["doc"]
        for row in db.all_docs(include_docs=True)["rows"]
        if row["doc"].get("owner") in (worker.instance, second.instance)
        and row["doc"].get("status") in ("scheduled", "running")
    ]
    assert not held, f"held by a stopped instance: {brief(held)}"
    assert not crashes, f"a thread died: {crashes[0].exc_type.__name__}: {crashes[0].exc_value}"
    errors = [f"{r.name}: {r.getMessage()} {r.exc_text or ''}" for r in watch.records]

    counts = fuzz.counts
    print(
        f"\nfuzz: {counts['sent']} documents and updates sent in {EXAMPLES} examples in "
        f"{fuzzed - started:.1f}s ({time.monotonic() - started:.1f}s in all): "
        f"{counts['accepted']} accepted, {counts['refused']} refused (403/401), "
        f"{counts['conflict']} conflicts (409); {len(everything)} documents at the end, "
        f"{counts['written last by the worker']} of them written last by the worker"
        + ("; anonymous = server admin (admin party)" if party else "")
    )
    for key, value in sorted(counts.items()):
        print(f"  {key}: {value}")
    print("  accepted moves: " + ", ".join(f"{k} {v}" for k, v in sorted(fuzz.moves.items())))
    for key, value in sorted(fuzz.unsure.items()):
        print(f"  known discrepancy, {key}: {value}")
    for line in errors[:20]:
        print(f"  worker error: {line[:500]}")
    assert counts["sent"] >= MIN_SENT
    assert counts["accepted"] and counts["refused"]
    assert not errors, f"the worker logged {len(errors)} error(s), the first: {errors[0]}"


# -- what the fuzzing found, now fixed: each case pinned by a test of its own ----------------------


def post_raw(database: Database, body: str, path: str = "") -> requests.Response:
    """POST a JSON text as it is (Python's json cannot write what is nested too deep)."""
    return database.server.session.post(
        f"{database.server.url}{database.path}{path}",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


@dataclass
class Workers:
    """Workers on threads, started without waiting long for one that dies at start-up."""

    running: list[tuple[Worker, threading.Thread]] = field(default_factory=list)
    died: dict[str, BaseException] = field(default_factory=dict)

    def start(self, config: Config, name: str, **options: Any) -> Worker:
        worker = Worker(config, name, **options)

        def run() -> None:
            try:
                worker.run()
            except BaseException as exc:
                self.died[worker.instance] = exc
                raise

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.running.append((worker, thread))
        deadline = time.monotonic() + 15
        while not worker.ready.wait(0.05):
            assert thread.is_alive(), f"{name} died starting: {self.died.get(worker.instance)!r}"
            assert time.monotonic() < deadline, f"the worker {name} did not start"
        return worker


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = Workers()
    yield started
    for worker, thread in started.running:
        worker.stop()
        thread.join(15)


@pytest.mark.parametrize("where", ["repeat", "misfire", "retry", "a done task"])
def test_a_field_named_hasOwnProperty_is_refused_not_a_server_error(
    users: Any, secured: Database, where: str
) -> None:
    client = Server(secured.server.url, users.credentials["client"]).database(secured.name)
    worker = Server(secured.server.url, users.credentials["worker"]).database(secured.name)
    if where == "a done task":  # a worker edits a done task and adds the field
        doc = new_task(job={"name": "noop"})
        doc["_id"], doc["_rev"] = secured.post(doc)
        for status in ("scheduled", "running", "done"):
            doc["status"] = status
            secured.put(doc)
        doc, writer = {**doc, "hasOwnProperty": 1}, worker
    else:
        value = {"repeat": {"cron": "* * * * *"}, "misfire": {"policy": "skip"}}
        value["retry"] = {"limit": 1}
        doc, writer = new_task(**{where: {"hasOwnProperty": 1, **value[where]}}), client
    if "_rev" in doc:
        url = f"{writer.server.url}{writer.path}/{doc['_id']}"
        answer = writer.server.session.put(url, json=doc, timeout=30)
    else:
        answer = post_raw(writer, json.dumps(doc))
    assert answer.status_code == 403, (answer.status_code, answer.text[:300])
    rule = "done is final" if where == "a done task" else "hasOwnProperty"
    assert rule in answer.json()["reason"], answer.text[:300]
    (row,) = writer.bulk_docs([doc])  # a cluster's 500 row is looked into (after.couch)
    assert row.get("error") == "forbidden" and rule in row["reason"], row


@pytest.mark.parametrize("nickname", ["@daily", "@hourly"])
def test_the_readmes_cron_nicknames_are_accepted(secured: Database, nickname: str) -> None:
    secured.post(new_task(repeat={"cron": nickname}))


@pytest.mark.parametrize(
    "date",
    [
        pytest.param("0000-01-01", id="year-0"),
        pytest.param("0001-01-01", id="the-first-instant"),
        pytest.param("0001-01-01T00:30:00+01:00", id="before-year-1-in-UTC"),
        pytest.param("9999-12-31T23:00:00-05:00", id="after-year-9999-in-UTC"),
    ],
)
def test_a_worker_copes_with_dates_it_cannot_represent(
    users: Any,
    secured: Database,
    as_worker: Config,
    workers: Workers,
    watched: tuple[Watch, list[threading.ExceptHookArgs]],
    date: str,
) -> None:
    watch, crashes = watched
    workers.start(as_worker, "calendar")
    client = Server(secured.server.url, users.credentials["client"]).database(secured.name)
    try:
        doc_id, _ = client.post(new_task(worker="calendar", date=date, job={"name": "noop"}))
    except CouchError as refusal:  # refusing such a date is a fix too
        assert refusal.status == 403 and refusal.reason.startswith("date:")
        return
    assert run_a_normal_task(secured, "calendar", timeout=10)["status"] == "done"
    workers.start(as_worker, "calendar")  # reads the task at start-up
    assert run_a_normal_task(secured, "calendar", timeout=10)["status"] == "done"
    if date < "2000":  # overdue: it cannot run, so it fails with the reason
        failed = wait_for(lambda: (d := secured.get(doc_id))["status"] == "err" and d, 4)
        assert "date" in json.dumps(failed["error"])
    assert not crashes, crashes[0].exc_value
    assert not watch.records, watch.records[0].getMessage()


def test_a_task_nested_deeper_than_python_reads_does_not_stop_the_worker(
    secured: Database,
    as_worker: Config,
    workers: Workers,
    watched: tuple[Watch, list[threading.ExceptHookArgs]],
) -> None:
    _, crashes = watched
    workers.start(as_worker, "deep")
    depth = 2000
    doc = json.dumps(new_task(worker="deep", date="2999-01-01", job={"name": "noop"}))
    nested = doc.replace(
        '"name": "noop"', '"name": "noop", "arguments": ' + "[" * depth + "]" * depth
    )
    answer = post_raw(secured, nested)
    if answer.status_code in (400, 403, 413):  # refusing it is a fix too
        return
    assert answer.status_code == 201, answer.text
    time.sleep(1)  # the feed brings it
    assert not crashes, f"{crashes[0].thread.name}: {crashes[0].exc_value!r}"
    assert run_a_normal_task(secured, "deep", timeout=5)["status"] == "done"


def test_a_document_nested_too_deep_for_the_server_is_refused_not_a_500(
    secured: Database,
) -> None:
    depth = 20_000
    doc = json.dumps(new_task(job={"name": "noop"}))
    nested = doc.replace(
        '"name": "noop"', '"name": "noop", "arguments": ' + "[" * depth + "]" * depth
    )
    answer = post_raw(secured, nested)
    assert answer.status_code < 500, (answer.status_code, answer.text[:200])
    assert secured.info()  # and the server still answers


def test_a_task_given_to_another_worker_during_a_claim_is_not_run_by_the_first(
    users: Any, secured: Database, as_worker: Config, workers: Workers
) -> None:
    client = Server(secured.server.url, users.credentials["client"]).database(secured.name)
    first = workers.start(as_worker, "first")
    write = first.writer.write
    moved = threading.Event()

    def reassign_then_write(doc: dict[str, Any], on_result: Any, within: float = 0.0) -> None:
        # The claim: `scheduled`, or `running` when the claim commits the run too (due now).
        if doc.get("claimed_at") and not moved.is_set():
            current = client.get(doc["_id"])
            assert current is not None
            client.put({**current, "worker": "second"})  # the client's move lands first
            moved.set()
        write(doc, on_result, within)

    first.writer.write = reassign_then_write  # type: ignore[method-assign]
    doc_id, _ = client.post(new_task(worker="first", date="2001-01-01", job={"name": "noop"}))
    assert moved.wait(10), "the worker did not try to claim the task"
    deadline = time.monotonic() + 6.5  # the worker re-reads a task within 5 s of a conflict
    while (task := secured.get(doc_id))["status"] == "waiting" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert task["worker"] == "second" and task["status"] == "waiting", brief(task)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"state": "stopped", "last_seen": "yesterday"}, id="last_seen"),
        pytest.param({"state": "lost", "reaped_at": "never"}, id="reaped_at"),
    ],
)
def test_a_record_with_an_unreadable_date_does_not_stop_the_housekeeping(
    users: Any,
    secured: Database,
    as_worker: Config,
    workers: Workers,
    watched: tuple[Watch, list[threading.ExceptHookArgs]],
    fields: dict[str, Any],
) -> None:
    _, crashes = watched
    worker = workers.start(as_worker, "beat", heartbeat=0.3, lease=2.0)
    other = Server(secured.server.url, users.credentials["worker"]).database(secured.name)
    instance = "beat@elsewhere:1:x"
    other.put(
        {"_id": PREFIX + instance, "type": "worker", "name": "beat", "instance": instance, **fields}
    )
    time.sleep(1.2)  # four heartbeats, four reads of the peers' records
    assert not crashes, f"{crashes[0].thread.name}: {crashes[0].exc_value!r}"
    first = secured.get(PREFIX + worker.instance)["lease_until"]
    wait_for(lambda: secured.get(PREFIX + worker.instance)["lease_until"] > first, timeout=2)
