"""The worker's decisions and the documents it writes, as plain functions."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from after import runs, tasks
from after.tasks import Local, Step, next_step

ME = "manobi@host:1:aaaa"
OTHER = "manobi@host:2:bbbb"
DATE = "2026-12-01T09:30:00Z"  # the date of every task here but a rescheduled one


def doc(status: str, owner: str | None = None, **fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "_id": "t1",
        "_rev": "1-x",
        "worker": "manobi",
        "date": DATE,
        "job": {"name": "echo", "arguments": [1]},
        "status": status,
    }
    if owner:
        base["owner"] = owner
    return {**base, **fields}


@pytest.mark.parametrize(
    ("status", "owner", "local", "step"),
    [
        ("waiting", None, Local.NONE, Step.CLAIM),
        ("reschedule", ME, Local.HELD, Step.CLAIM),
        ("reschedule", OTHER, Local.NONE, Step.CLAIM),
        ("scheduled", ME, Local.NONE, Step.HOLD),
        ("scheduled", ME, Local.HELD, Step.HOLD),
        ("scheduled", OTHER, Local.NONE, Step.CLAIM),
        ("scheduled", OTHER, Local.HELD, Step.FORGET),
        ("running", ME, Local.COMMITTED, Step.IGNORE),
        ("running", ME, Local.RUNNING, Step.IGNORE),
        ("running", OTHER, Local.NONE, Step.LOST),
        ("running", OTHER, Local.HELD, Step.FORGET),
        ("cancel", ME, Local.HELD, Step.CANCEL),
        ("cancel", ME, Local.COMMITTED, Step.CANCEL),
        ("cancel", ME, Local.RUNNING, Step.CANCEL_AFTER_RUN),
        ("cancel", None, Local.NONE, Step.CANCEL),
        ("done", ME, Local.NONE, Step.FORGET),
        ("err", ME, Local.NONE, Step.FORGET),
        ("canceled", ME, Local.HELD, Step.FORGET),
    ],
)
def test_next_step(status: str, owner: str | None, local: Local, step: Step) -> None:
    assert next_step(doc(status, owner), ME, local) is step


def test_a_running_of_ours_never_started_here_is_handed_back_not_lost() -> None:
    # A commit refused by a cluster's quorum yet stored on a minority of its copies.
    assert next_step(doc("running", ME), ME, Local.NONE, started_here=False) is Step.RELEASE
    assert next_step(doc("running", ME), ME, Local.HELD, started_here=False) is Step.RELEASE
    assert next_step(doc("running", ME), ME, Local.NONE, started_here=True) is Step.LOST


def test_a_cancel_of_a_live_peers_task_is_left_to_that_peer() -> None:
    """Only its owner knows whether its run began and what it ended with: another
    instance that confirmed the cancel (`canceled`) lost the run's record and its
    outcome (issue #31, found by the soak). A dead owner's cancel is anyone's."""
    alive = lambda owner: owner == OTHER  # noqa: E731
    assert next_step(doc("cancel", OTHER), ME, Local.NONE, owner_alive=alive) is Step.FORGET
    assert next_step(doc("cancel", OTHER), ME, Local.NONE) is Step.CANCEL  # OTHER is dead


def test_every_status_has_a_decision() -> None:
    for status in tasks.STATUSES:
        for local in Local:
            assert isinstance(next_step(doc(status, OTHER), ME, local), Step)


def lost(task: dict[str, object], now: datetime) -> dict[str, object]:
    """What a worker writes for a task whose instance died mid-run."""
    return runs.after_run_update(
        tasks.taken_over(task, now), runs.policy_of(task), tasks.lost_outcome(task, now), now
    )


def test_a_lost_run_fails_or_is_retried_by_its_policy() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    failed = lost(doc("running", OTHER, attempt=1), now)
    assert failed["status"] == "err"
    assert failed["error"]["type"] == "WorkerLost"
    assert failed["takeovers"][-1]["from"] == OTHER
    assert failed["history"][-1]["instance"] == OTHER
    retried = lost(doc("running", OTHER, attempt=1, retry={"limit": 2, "jitter": False}), now)
    assert retried["status"] == "waiting"
    assert tasks.parse_date(retried["date"]) == now + timedelta(seconds=10)  # the first delay
    assert "owner" not in retried


def test_the_steps_write_only_transitions_the_table_allows() -> None:
    """Each document a step writes moves the task along an edge of rules.json."""
    now = datetime(2026, 12, 1, tzinfo=UTC)
    writes = [
        ("waiting", tasks.claim_update(doc("waiting"), ME, now)),
        ("reschedule", tasks.claim_update(doc("reschedule"), ME, now)),
        ("scheduled", tasks.running_update(doc("scheduled", ME), ME)),
        ("scheduled", tasks.hand_back_update(doc("scheduled", ME))),
        ("cancel", tasks.canceled_update(doc("cancel"), now)),
        ("running", lost(doc("running", OTHER), now)),
        ("running", tasks.outcome_update(doc("running", ME), {"result": 1})),
        ("running", tasks.outcome_update(doc("running", ME), {"error": {"type": "X"}})),
        ("cancel", tasks.outcome_update(doc("cancel", ME), {"result": 1})),
    ]
    for before, written in writes:
        assert written["status"] in tasks.TRANSITIONS[before], (before, written["status"])
        assert tasks.TRANSITIONS[before][written["status"]] == "worker"


def test_claim_records_owner_and_time_and_hand_back_removes_them() -> None:
    at = datetime(2026, 12, 1, 9, 0, 0, 123456, tzinfo=UTC)
    claimed = tasks.claim_update(doc("waiting"), ME, at)
    assert claimed["owner"] == ME
    assert claimed["claimed_at"] == "2026-12-01T09:00:00.123Z"
    handed_back = tasks.hand_back_update(claimed)
    assert handed_back["status"] == "waiting"
    assert "owner" not in handed_back
    assert "claimed_at" not in handed_back


def test_a_worker_write_keeps_the_fields_it_does_not_set_a_null_too() -> None:
    """validate_doc_update refuses a worker write that changes `force` (null -> absent)."""
    task = {**doc("waiting"), "force": None, "note": None}
    claimed = tasks.claim_update(task, ME, datetime(2026, 12, 1, tzinfo=UTC))
    assert claimed["force"] is None and claimed["note"] is None
    assert "owner" not in tasks.hand_back_update(claimed)  # a field set to None still goes


def test_running_counts_attempts() -> None:
    first = tasks.running_update(doc("scheduled", ME), ME)
    assert first["attempt"] == 1
    assert tasks.running_update({**first, "status": "scheduled"}, ME)["attempt"] == 2


def test_an_outcome_records_times_and_result_or_error() -> None:
    started = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    finished = started + timedelta(milliseconds=12.5)
    ok = tasks.outcome_update(
        doc("running", ME), tasks.outcome_fields(started, finished, result=[1])
    )
    assert ok["status"] == "done"
    assert ok["result"] == [1]
    assert ok["duration_ms"] == 12.5
    assert ok["started_at"] == "2026-12-01T09:30:00.000Z"
    assert "error" not in ok
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        failed_fields = tasks.outcome_fields(started, finished, error=exc)
    failed = tasks.outcome_update(doc("running", ME, result="old"), failed_fields)
    assert failed["status"] == "err"
    assert "result" not in failed
    assert failed["error"]["type"] == "ValueError"
    assert failed["error"]["message"] == "bad value"
    assert "raise ValueError" in failed["error"]["traceback"]


def test_a_huge_error_message_is_cut_with_a_marker() -> None:
    info = tasks.error_info(RuntimeError("x" * 100_000))
    assert len(info["message"]) < tasks.MAX_TEXT + 100
    assert info["message"].endswith("more characters]")


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2011-10-12", "2011-10-12T00:00:00.000Z"),
        ("2026-12-01T09:30", "2026-12-01T09:30:00.000Z"),
        ("2026-12-01T09:30:00", "2026-12-01T09:30:00.000Z"),
        ("2026-12-01 09:30:00", "2026-12-01T09:30:00.000Z"),
        ("2026-12-01T09:30:00Z", "2026-12-01T09:30:00.000Z"),
        ("2026-12-01T09:30:00.5Z", "2026-12-01T09:30:00.500Z"),
        ("2026-12-01T09:30:00.123456+02:00", "2026-12-01T07:30:00.123Z"),
        ("2026-12-01T01:00:00-05:30", "2026-12-01T06:30:00.000Z"),
    ],
)
def test_dates_are_read_as_the_contract_says(text: str, utc: str) -> None:
    """Same answers as the views' `due` key (tests/test_designdoc.py checks the JS side)."""
    assert re.fullmatch(tasks.RULES["patterns"]["date"], text)
    assert tasks.iso(tasks.parse_date(text)) == utc


def test_revision_numbers() -> None:
    assert tasks.rev_number("12-abc") == 12
    assert tasks.rev_number(None) == 0


def test_a_huge_result_is_stored_as_a_marked_preview() -> None:
    assert tasks.cap_result({"small": [1, 2]}) == {"small": [1, 2]}
    capped = tasks.cap_result("y" * 200_000)
    assert capped["truncated"] is True
    assert capped["size"] == 200_002
    assert capped["preview"].endswith("more characters]")
    assert len(capped["preview"]) < 1100


def test_a_conflict_is_resolved_by_recording_every_losing_run_on_the_winner() -> None:
    winner = doc("done", OTHER, _rev="5-w", _conflicts=["4-l"])
    # the loser is itself a resolution made on the other replica: its record is kept too
    earlier = {"rev": "4-e", "status": "done", "owner": ME, "attempt": 1}
    loser = doc("running", OTHER, _rev="4-l", attempt=1, conflicts_resolved=[earlier])

    updated, *deletions = tasks.resolve_conflict(winner, [loser])

    assert "_conflicts" not in updated and updated["_rev"] == "5-w"
    assert updated["conflicts_resolved"] == [
        earlier,
        {
            "rev": "4-l",
            "status": "running",
            "owner": OTHER,
            "attempt": 1,
            "date": DATE,
        },
    ]
    assert deletions == [{"_id": "t1", "_rev": "4-l", "_deleted": True, "resolves_conflict": True}]
    # the same conflict resolved on both replicas writes the same content
    assert tasks.resolve_conflict(winner, [loser]) == [updated, *deletions]
    # a record already on the winner is not written twice
    again, *_ = tasks.resolve_conflict({**updated, "_conflicts": ["4-l"]}, [loser])
    assert again["conflicts_resolved"] == updated["conflicts_resolved"]


def test_two_resolutions_of_one_conflict_made_at_once_on_two_replicas_converge() -> None:
    """Both sides resolved the same conflict (each judged the other instance gone):
    the same content under two revision ids, as PouchDB Server draws them at random.
    The loser is only deleted; recording it would make the next two resolutions
    differ again, and the task would stay in conflict for good."""
    record = [{"rev": "3-l", "status": "done", "owner": OTHER, "attempt": 1}]
    east = doc("done", ME, _rev="4-e", attempt=1, conflicts_resolved=record)
    west = {**east, "_rev": "4-f"}

    updated, *deletions = tasks.resolve_conflict({**west, "_conflicts": ["4-e"]}, [east])

    assert updated == west  # nothing new to write: only the twin goes
    assert deletions == [{"_id": "t1", "_rev": "4-e", "_deleted": True, "resolves_conflict": True}]
    # A twin with more on record still brings its record.
    more = [*record, {"rev": "3-m", "status": "running", "owner": OTHER, "attempt": 2}]
    updated, *_ = tasks.resolve_conflict(west, [{**east, "conflicts_resolved": more}])
    assert updated["conflicts_resolved"] == more


def test_a_run_still_under_way_on_the_winner_takes_its_end_from_a_losing_revision() -> None:
    """Between replicas the run's `done` can lose to an older write about the same run
    (a resolution recorded on its `running`): the end is the newer news and is kept."""
    winner = doc("running", ME, _rev="5-w", attempt=1, _conflicts=["5-d"])
    end = {"started_at": "2026-12-01T09:30:00.000Z", "ended_at": "2026-12-01T09:30:01.000Z"}
    done = doc("done", ME, _rev="5-d", attempt=1, result=42, **end)

    updated, *deletions = tasks.resolve_conflict(winner, [done])

    assert updated["_rev"] == "5-w" and "_conflicts" not in updated
    assert updated["status"] == "done" and updated["result"] == 42
    assert updated["ended_at"] == end["ended_at"]
    assert updated["conflicts_resolved"] == [
        {"rev": "5-d", "status": "done", "owner": ME, "attempt": 1, "date": DATE}
    ]
    assert deletions == [{"_id": "t1", "_rev": "5-d", "_deleted": True, "resolves_conflict": True}]
    assert tasks.resolve_conflict(winner, [done]) == [updated, *deletions]  # same on each node


def test_a_losing_revision_that_got_further_than_the_winner_is_kept() -> None:
    """A partition: the minority side's instance claimed the task, could not confirm
    the claim and handed it back (after.quorum); the majority side ran it. Whichever
    revision CouchDB picks, the run is what stays, so the task is not run again."""
    ran = {"attempt": 1, "started_at": "2026-12-01T09:30:00.100Z"}
    done = doc("done", OTHER, _rev="4-d", finished_at="2026-12-01T09:30:00.200Z", **ran)
    handed_back = doc("waiting", _rev="4-w", _conflicts=["4-d"])

    updated, *deletions = tasks.resolve_conflict(handed_back, [done])

    # The run's revision is kept as it is (waiting -> done is no worker's move), the
    # handed-back one deleted and recorded.
    assert updated == {**done, "conflicts_resolved": [
        {"rev": "4-w", "status": "waiting", "owner": None, "attempt": None, "date": DATE}
    ]}  # fmt: skip
    assert deletions == [{"_id": "t1", "_rev": "4-w", "_deleted": True, "resolves_conflict": True}]
    assert tasks.resolve_conflict(handed_back, [done]) == [updated, *deletions]  # on each node
    # A run committed on one side and only claimed on the other: the commit stays.
    claimed = doc("scheduled", ME, _rev="3-c", _conflicts=["3-r"])
    running = doc("running", OTHER, _rev="3-r", attempt=1)
    assert tasks.resolve_conflict(claimed, [running])[0]["_rev"] == "3-r"
    # Of two sides that got as far, CouchDB's winner stays.
    other_claim = doc("scheduled", OTHER, _rev="3-a")
    assert tasks.resolve_conflict(claimed, [other_claim])[0]["owner"] == ME
    # A final winner stays whatever the losers did.
    lost = doc("err", OTHER, _rev="5-e", attempt=1, finished_at="2026-12-01T09:31:00.000Z")
    assert tasks.resolve_conflict({**done, "_conflicts": ["5-e"]}, [lost])[0]["_rev"] == "4-d"


def test_a_runs_own_end_is_kept_over_a_worker_lost_judged_by_the_other_side() -> None:
    """A partition: the majority judged the cut-off instance dead and failed its run
    as "worker lost"; the instance had finished the run, and its `done` was stored on
    the minority side. Whichever revision CouchDB picks, what the run did is kept."""
    ran = {"attempt": 1, "started_at": "2026-12-01T09:30:00.100Z"}
    done = doc("done", OTHER, _rev="4-d", finished_at="2026-12-01T09:30:00.200Z", **ran)
    lost = doc(
        "err",
        OTHER,
        _rev="4-l",
        _conflicts=["4-d"],
        finished_at="2026-12-01T09:30:09.000Z",
        error=tasks.lost_outcome(done, tasks.now())["error"],
        **ran,
    )
    updated, *deletions = tasks.resolve_conflict(lost, [done])
    assert (updated["_rev"], updated["status"]) == ("4-d", "done")
    assert [d["_rev"] for d in deletions] == ["4-l"]
    # Not another instance's end, nor another attempt's: then the furthest stays.
    failed = {**done, "status": "err", "error": {"type": "ValueError", "message": "no"}}
    someone_else = {**failed, "owner": ME}
    assert tasks.resolve_conflict(lost, [someone_else])[0]["_rev"] == "4-l"
    earlier = {**failed, "attempt": 0}
    assert tasks.resolve_conflict(lost, [earlier])[0]["_rev"] == "4-l"


NEW_DATE = "2026-12-01T10:00:00Z"


@pytest.mark.parametrize("cancel_wins", [True, False], ids=["cancel won", "claim won"])
def test_a_clients_cancel_beside_a_claim_stands_whichever_revision_wins(cancel_wins: bool) -> None:
    """A cluster: the client's cancel (answered 202, stored on one copy) and a worker's
    claim were both based on the waiting task. The cancel is kept; the claim recorded."""
    cancel = doc("cancel", _rev="3-c", attempt=0)
    claim = doc("scheduled", ME, _rev="3-s", attempt=0, claimed_at="2026-12-01T09:29:59Z")
    winner, loser = (cancel, claim) if cancel_wins else (claim, cancel)

    updated, *deletions = tasks.resolve_conflict({**winner, "_conflicts": [loser["_rev"]]}, [loser])

    assert updated == {**cancel, "conflicts_resolved": [
        {"rev": "3-s", "status": "scheduled", "owner": ME, "attempt": 0, "date": DATE}
    ]}  # fmt: skip
    assert [d["_rev"] for d in deletions] == ["3-s"]


def test_a_cancel_carried_out_stands_beside_a_commit_handed_back() -> None:
    """A client's cancel answered 201 was carried out (`canceled`) on its side; the
    other side's commit, answered 202, was handed back (`waiting`). The task must not
    come back to life and run."""
    canceled = doc("canceled", OTHER, _rev="4-c", attempt=0, canceled_at="2026-12-01T09:29:59Z")
    handed_back = doc("waiting", _rev="4-w", attempt=0)
    for winner, loser in ((handed_back, canceled), (canceled, handed_back)):
        updated, *_ = tasks.resolve_conflict({**winner, "_conflicts": [loser["_rev"]]}, [loser])
        assert (updated["_rev"], updated["status"]) == ("4-c", "canceled")


@pytest.mark.parametrize("cancel_wins", [True, False], ids=["cancel won", "commit won"])
def test_a_clients_cancel_beside_a_committed_run_cancels_that_run(cancel_wins: bool) -> None:
    """The cancel was based on the claimed task, the commit too. The run may have begun:
    the cancel is kept with the run's worker fields, so its instance sees a cancel of
    its own run (recorded when the job ends), and no one runs the task again."""
    claimed = {"attempt": 0, "claimed_at": "2026-12-01T09:29:59Z"}
    cancel = doc("cancel", OTHER, _rev="4-c", **claimed)
    running = doc("running", OTHER, _rev="4-r", **{**claimed, "attempt": 1})
    winner, loser = (cancel, running) if cancel_wins else (running, cancel)

    updated, *deletions = tasks.resolve_conflict({**winner, "_conflicts": [loser["_rev"]]}, [loser])

    assert (updated["_rev"], updated["status"]) == ("4-c", "cancel")
    assert (updated["owner"], updated["attempt"]) == (OTHER, 1)
    assert updated["date"] == cancel["date"] and updated["job"] == cancel["job"]
    assert [d["_rev"] for d in deletions] == ["4-r"]
    assert tasks.next_step(updated, OTHER, Local.RUNNING) is Step.CANCEL_AFTER_RUN


def test_a_clients_reschedule_stands_beside_a_claim_not_beside_a_committed_run() -> None:
    base = {"attempt": 0}
    reschedule = doc("reschedule", _rev="3-d", date=NEW_DATE, **base)
    claim = doc("scheduled", ME, _rev="3-s", **base)
    updated, *_ = tasks.resolve_conflict({**claim, "_conflicts": ["3-d"]}, [reschedule])
    assert (updated["_rev"], updated["status"], updated["date"]) == ("3-d", "reschedule", NEW_DATE)

    # A run committed beside it may have begun: it cannot be moved; the reschedule is
    # recorded as a losing revision, to be seen on the task.
    running = doc("running", ME, _rev="3-r", attempt=1)
    updated, *_ = tasks.resolve_conflict({**reschedule, "_conflicts": ["3-r"]}, [running])
    assert (updated["_rev"], updated["status"]) == ("3-r", "running")
    assert updated["conflicts_resolved"] == [
        {
            "rev": "3-d",
            "status": "reschedule",
            "owner": None,
            "attempt": 0,
            "date": "2026-12-01T10:00:00Z",
        }
    ]


def test_a_withdrawn_hand_back_gives_way_to_a_reschedule_taken_up_on_the_other_side() -> None:
    """A cluster: an instance's claim was answered 202 and handed back, marked withdrawn
    (after.quorum); meanwhile a client's reschedule, answered 201, was taken up by
    another instance (`scheduled` at the new date). Both got as far (no run), so
    without the mark CouchDB's pick would decide, and the reschedule be lost half the
    time. The withdrawn hand-back gives way, whichever revision wins."""
    handed_back = tasks.withdrawn_update(doc("waiting", _rev="4-w", attempt=0))
    taken_up = doc("scheduled", OTHER, _rev="4-s", attempt=0, date=NEW_DATE)
    for winner, loser in ((handed_back, taken_up), (taken_up, handed_back)):
        updated, *deletions = tasks.resolve_conflict(
            {**winner, "_conflicts": [loser["_rev"]]}, [loser]
        )
        assert (updated["_rev"], updated["date"], updated["owner"]) == ("4-s", NEW_DATE, OTHER)
        assert [d["_rev"] for d in deletions] == ["4-w"]
        assert updated["conflicts_resolved"][0]["status"] == "waiting"


def test_a_withdrawn_hand_back_stays_beside_another_withdrawn_or_a_revision_less_far() -> None:
    ours = tasks.withdrawn_update(doc("waiting", _rev="4-w", attempt=1))
    theirs = tasks.withdrawn_update(doc("waiting", _rev="4-v", attempt=1, date=NEW_DATE))
    assert tasks.resolve_conflict(ours, [theirs])[0]["_rev"] == "4-w"  # CouchDB's winner
    claimed_before = doc("scheduled", OTHER, _rev="4-s", attempt=0)  # an attempt fewer
    assert tasks.resolve_conflict(ours, [claimed_before])[0]["_rev"] == "4-w"


def test_only_a_hand_back_of_an_unconfirmed_write_is_marked_withdrawn() -> None:
    """A worker's next move of the task (a claim, a commit, a cancel carried out, any
    other hand-back) clears the mark: it then stands as any revision does."""
    at = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    marked = tasks.withdrawn_update(tasks.hand_back_update(doc("scheduled", ME)))
    assert marked["withdrawn"] is True and marked["status"] == "waiting"
    for move in (
        tasks.claim_update(marked, ME, at),
        tasks.running_update(marked, ME),
        tasks.hand_back_update(marked),
        tasks.canceled_update({**marked, "status": "cancel"}, at),
    ):
        assert "withdrawn" not in move, move["status"]


@pytest.mark.parametrize("ended", ["done", "err", "canceled"])
def test_a_clients_move_beside_a_task_that_ended_is_only_recorded(ended: str) -> None:
    end = doc(ended, ME, _rev="5-e", attempt=1, finished_at="2026-12-01T09:30:01Z")
    cancel = doc("cancel", ME, _rev="4-c", attempt=0)
    updated, *_ = tasks.resolve_conflict({**end, "_conflicts": ["4-c"]}, [cancel])
    assert (updated["_rev"], updated["status"]) == ("5-e", ended)
    assert updated["conflicts_resolved"][0]["status"] == "cancel"


@pytest.mark.parametrize(
    "winner, loser",
    [
        (doc("running", ME, attempt=1), doc("err", OTHER, attempt=1)),  # another's run
        (doc("running", ME, attempt=2), doc("err", ME, attempt=1)),  # an earlier attempt
        (doc("cancel", ME, attempt=1), doc("err", ME, attempt=1)),  # a client's request
        (doc("running", ME, attempt=1), doc("scheduled", ME, attempt=1)),  # not an end
    ],
    ids=["other owner", "earlier attempt", "winner not running", "loser not ended"],
)
def test_the_winner_stays_unless_a_loser_ended_its_own_run(
    winner: dict[str, object], loser: dict[str, object]
) -> None:
    winner = {**winner, "_rev": "5-w", "_conflicts": ["5-l"]}
    loser = {**loser, "_rev": "5-l"}
    updated, *_ = tasks.resolve_conflict(winner, [loser])
    assert updated["status"] == winner["status"] and updated["owner"] == winner["owner"]
    assert updated["attempt"] == winner["attempt"]


def test_a_cancel_of_a_run_stands_over_that_runs_end_whichever_couchdb_picks() -> None:
    """A cluster: the client's cancel of a running task (answered 201) and the run's
    `done` were both based on the `running`; the cancel was carried out on its side.
    As on one node, where the instance records the run as canceled when its job ends,
    the task is canceled; the run's end is recorded."""
    ran = {"attempt": 1, "started_at": "2026-12-01T09:30:00.100Z"}
    done = doc("done", ME, finished_at=T1, result=42, **ran)
    canceled = doc("canceled", ME, canceled_at=T2, **ran)
    for done_rev, canceled_rev in (("4-a", "4-b"), ("4-b", "4-a")):
        leaves = [{**done, "_rev": done_rev}, {**canceled, "_rev": canceled_rev}]
        updated, *deletions = resolved(leaves)
        assert (updated["_rev"], updated["status"]) == (canceled_rev, "canceled")
        assert [d["_rev"] for d in deletions] == [done_rev]
        assert updated["conflicts_resolved"][0]["status"] == "done"
    # The end of another attempt, or of another instance's run, is no run it canceled.
    for other in ({**done, "attempt": 2}, {**done, "owner": OTHER}):
        leaves = [{**other, "_rev": "4-a"}, {**canceled, "_rev": "4-b"}]
        assert resolved(leaves)[0]["_rev"] == "4-a"


@pytest.mark.parametrize("final", ["done", "canceled"])
def test_a_final_revision_stands_over_any_not_final_whichever_couchdb_picks(final: str) -> None:
    """Two runs of one attempt on two branches (a partition): the one that ended the
    task stands, and every resolver, whatever leaves it sees, keeps the same one."""
    ended = doc(final, OTHER, _rev="5-a", attempt=1)
    running = doc("running", ME, _rev="5-b", attempt=1, finished_at="2026-12-01T09:31:00Z")
    updated, *deletions = tasks.resolve_conflict({**running, "_conflicts": ["5-a"]}, [ended])
    assert (updated["_rev"], updated["status"]) == ("5-a", final)
    assert [d["_rev"] for d in deletions] == ["5-b"]


def test_news_is_a_later_version_or_any_other_of_the_same_generation() -> None:
    ours = {"_rev": "3-aaa", "status": "waiting"}
    assert tasks.is_news({"_rev": "4-bbb"}, ours)
    assert not tasks.is_news({"_rev": "2-bbb"}, ours)
    assert not tasks.is_news({"_rev": "3-aaa"}, ours)  # the echo of our own write
    assert tasks.is_news({"_rev": "3-aaa", "_conflicts": ["3-ccc"]}, ours)
    # A sibling without a conflict: ours was the losing side, deleted by a resolution
    # on another node (a cluster's or a replica's). Ignoring it would leave us acting
    # on a branch that is gone, e.g. claiming a task the other side has run.
    assert tasks.is_news({"_rev": "3-ccc", "status": "done"}, ours)


def test_a_run_ends_on_the_task_as_it_is_now_while_that_continues_the_run() -> None:
    run_doc = {"_rev": "3-a", "status": "running", "owner": "me", "attempt": 1}
    mine_again = {**run_doc, "_rev": "4-a", "conflicts_resolved": []}
    canceled = {**run_doc, "_rev": "4-b", "status": "cancel"}
    assert tasks.outcome_base(mine_again, run_doc, "me") is mine_again
    assert tasks.outcome_base(canceled, run_doc, "me") is canceled


def test_a_run_ends_on_its_own_branch_when_another_branch_won_meanwhile() -> None:
    run_doc = {"_rev": "3-a", "status": "running", "owner": "me", "attempt": 1}
    # Another instance's claim, stored without quorum and handed back, won the conflict
    # by its revision: `waiting` -> `done` would be refused and the outcome lost.
    handed_back = {"_rev": "3-z", "status": "waiting", "_conflicts": ["3-a"]}
    assert tasks.outcome_base(handed_back, run_doc, "me") is run_doc
    theirs = {"_rev": "3-y", "status": "running", "owner": "other", "attempt": 1}
    assert tasks.outcome_base(theirs, run_doc, "me") is run_doc
    assert tasks.outcome_base(handed_back, None, "me") is handed_back  # nothing better known


def test_a_refused_outcome_over_another_instances_running_names_the_run_that_happened() -> None:
    run_doc = {"_rev": "3-a", "status": "running", "owner": "me", "attempt": 1}
    at = tasks.parse_date("2026-12-06T22:00:00Z")
    # On a cluster: our branch was deleted by a resolution that kept the other's claim.
    theirs = {"_rev": "4-y", "status": "running", "owner": "other", "attempt": 1}
    base = tasks.outcome_base_over(theirs, run_doc, "me", at)
    assert (base["_rev"], base["owner"], base["attempt"]) == ("4-y", "me", 1)
    assert base["takeovers"] == [{"from": "other", "status": "running", "at": tasks.iso(at)}]
    mine = {**run_doc, "_rev": "4-a"}
    canceled = {**theirs, "status": "cancel"}
    assert tasks.outcome_base_over(mine, run_doc, "me", at) is mine
    assert tasks.outcome_base_over(canceled, run_doc, "me", at) is canceled
    assert tasks.outcome_base_over(theirs, None, "me", at) is theirs  # nothing better known
    # Our run was judged lost (its lease ran out) and the task's next attempt runs.
    retried = {**theirs, "attempt": 2}
    assert tasks.outcome_base_over(retried, run_doc, "me", at) is None


def test_a_running_never_started_is_handed_back_as_the_same_attempt() -> None:
    committed = tasks.running_update(doc("waiting", None), ME)
    assert committed["attempt"] == 1
    back = tasks.hand_back_update(committed)
    assert back["status"] == "waiting" and "owner" not in back and "attempt" not in back
    retry = tasks.running_update({**doc("waiting", None), "attempt": 2}, ME)
    assert tasks.hand_back_update(retry)["attempt"] == 2


# The kinds of revision a conflict's leaves can be, all branches of one waiting task.
T1, T2 = "2026-12-01T09:30:01Z", "2026-12-01T09:30:02Z"
LEAF_KINDS: dict[str, dict[str, object]] = {
    "handed back": doc("waiting", attempt=0),
    "withdrawn": tasks.withdrawn_update(doc("waiting", attempt=0)),
    "claimed": doc("scheduled", ME, attempt=0),
    "reschedule taken up": doc("scheduled", OTHER, attempt=0, date=NEW_DATE),
    "running here": doc("running", ME, attempt=1),
    "running there": doc("running", OTHER, attempt=1),
    "done here": doc("done", ME, attempt=1, finished_at=T1),
    "lost there": doc("err", OTHER, attempt=1, finished_at=T2, error={"type": tasks.LOST}),
    "cancel": doc("cancel", attempt=0),
    "reschedule": doc("reschedule", attempt=0, date=NEW_DATE),
    "canceled": doc("canceled", OTHER, attempt=0, canceled_at=T1),
    "run canceled here": doc("canceled", ME, attempt=1, canceled_at=T2),
    "cancel of the run here": doc("cancel", ME, attempt=1),
    "failed there": doc("err", OTHER, attempt=1, finished_at=T1, error={"type": "ValueError"}),
}


def couchdbs_winner(leaves: list[dict[str, object]]) -> dict[str, object]:
    """The revision CouchDB picks: the highest generation, then the highest id."""
    return max(leaves, key=lambda d: (tasks.rev_number(str(d["_rev"])), str(d["_rev"])))


def resolved(leaves: list[dict[str, object]]) -> list[dict[str, object]]:
    winner = couchdbs_winner(leaves)
    others = [leaf for leaf in leaves if leaf is not winner]
    conflicts = [str(leaf["_rev"]) for leaf in others]
    return tasks.resolve_conflict({**winner, "_conflicts": conflicts}, others)


@settings(max_examples=int(os.environ.get("AFTER_TEST_EXAMPLES", "300")), deadline=None)
@given(
    kinds=st.lists(st.sampled_from(sorted(LEAF_KINDS)), min_size=2, max_size=5, unique=True),
    generations=st.lists(st.integers(3, 6), min_size=5, max_size=5),
    written_id=st.text("0123456789abcdef", min_size=1, max_size=2),
    late=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_a_resolution_stands_beside_any_of_the_leaves_it_deleted(
    kinds: list[str], generations: list[int], written_id: str, late: list[bool]
) -> None:
    """Another resolver may see the revision a resolution wrote beside some of the
    leaves it deleted (their deletions not arrived yet). It must not choose otherwise:
    it keeps that revision, or CouchDB's winner with the same content. A resolver that
    keeps a losing revision deletes the others first (after.conflicts), so two that
    each kept another revision would delete each other's choice, and the task be lost."""
    leaves = [
        {**LEAF_KINDS[kind], "_rev": f"{generation}-{chr(97 + n)}"}
        for n, (kind, generation) in enumerate(zip(kinds, generations, strict=False))
    ]
    updated, *deletions = resolved(leaves)
    written = {**updated, "_rev": f"{tasks.rev_number(str(updated['_rev'])) + 1}-{written_id}"}
    deleted = {d["_rev"] for d in deletions}
    still_there = [
        leaf
        for leaf, is_late in zip(leaves, late, strict=False)
        if is_late and leaf["_rev"] in deleted
    ]
    if not still_there:
        return
    seen = [written, *still_there]
    again, *_ = resolved(seen)
    assert again["_rev"] in (written["_rev"], couchdbs_winner(seen)["_rev"]), kinds
    ignored = ("_rev", "conflicts_resolved")
    assert {k: v for k, v in again.items() if k not in ignored} == {
        k: v for k, v in written.items() if k not in ignored
    }, kinds


def test_a_dead_instances_run_canceled_is_recorded_as_that_runs_end() -> None:
    """A cancel of a commit whose instance died (the soak, seed 7: the run had begun, the
    task ended `canceled` with no record of it): the run may have begun, so the cancel
    is confirmed as that run's end, "worker lost", in the history."""
    at = datetime(2026, 12, 1, 9, 31, tzinfo=UTC)
    committed = tasks.running_update(doc("scheduled", OTHER), OTHER)
    canceled_run = {**committed, "status": "cancel"}
    assert runs.commit_unended(canceled_run)
    assert not runs.commit_unended(doc("cancel", OTHER))  # claimed, never committed
    written = lost(canceled_run, at)
    assert written["status"] == "canceled"
    assert (
        written["history"][-1]["attempt"] == 1 and "worker lost" in written["history"][-1]["error"]
    )
    assert not runs.commit_unended(written)
