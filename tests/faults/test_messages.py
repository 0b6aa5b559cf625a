"""Messages that should change nothing: duplicates, late and redelivered copies, canceled commands, forged rows and
forged messages; and several relays at once.

Each scenario runs real ``celery -A orch_outbox worker`` / ``beat`` subprocesses (see
``harness.py``) and ends with the ledger (``ledger.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kombu import Connection, Producer

from .harness import STEADY_DISPATCH, FaultProject

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]


def dropped(project: FaultProject, proc, name: str, cid, attempt: int) -> list[str]:  # type: ignore[no-untyped-def]
    """The worker's log lines saying it dropped that attempt's message without running it."""
    return project.log_lines(proc, f"dropped {name} {cid} attempt {attempt}:")


def test_duplicate_message_executes_once(lab) -> None:
    """Guarantee 3 (fenced claim): the same task message (same task id, same outbox header) delivered twice
    runs the handler once; the second copy finds the attempt already claimed, is logged as dropped and
    changes nothing."""
    p = lab.project(**STEADY_DISPATCH)
    worker = p.start_worker(concurrency=2)
    ids = p.push([p.cmd.work.s(i, seconds=0.3) for i in range(4)], rollback=[p.cmd.work.s(-1)])

    batch = p.outbox.store.claim(100, 3.0)  # the relay's claim...
    assert sorted(d.id for d in batch) == sorted(ids)
    assert p.outbox.relay.publish(batch) == 4  # ...its publish...
    assert p.outbox.relay.publish(batch) == 4  # ...and the very same messages once more

    p.wait_for(lambda: all(dropped(p, worker, "work", c, 1) for c in ids), "every duplicate to be dropped")
    p.wait_drained(relay=True)
    ledger = p.ledger()
    log = worker.output()
    for cid in ids:
        assert log.count(f"Task work[{cid}] received") == 2, log
        assert len(dropped(p, worker, "work", cid, 1)) == 1, log
        assert ledger.attempts(cid, "start") == [1]
        assert ledger.row(cid)["attempt"] == 1


def test_late_message_after_rescue_is_ignored(lab) -> None:
    """Guarantee 3 (fenced by attempt): a message for attempt 1 that arrives after the row's dispatch lease
    lapsed and it was redispatched as attempt 2 — and again after attempt 2 completed — is ignored; the
    command runs and completes once, as attempt 2."""
    p = lab.project()
    [cid] = p.push([p.cmd.work.s(0)], rollback=[p.cmd.work.s(-1)])
    [late] = p.outbox.store.claim(10, 3.0)  # attempt 1 claimed; its relay stalls before publishing
    assert (late.id, late.attempt) == (cid, 1)

    def rescued() -> dict | None:
        p.outbox.rescue_once()
        row = p.row(cid)
        return row if row and row["status"] == "pending" else None

    row = p.wait_for(rescued, "the dispatch lease to lapse", timeout=15)
    assert (row["attempt"], row["retries_left"]) == (1, 2), row
    assert p.outbox.relay_once() == 1  # attempt 2 is published
    assert p.row(cid)["attempt"] == 2
    assert p.outbox.relay.publish([late]) == 1  # the stalled relay wakes up: attempt 1 arrives after attempt 2

    worker = p.start_worker()
    done = p.wait_status(cid, "completed")
    assert done["attempt"] == 2, done
    p.wait_for(lambda: dropped(p, worker, "work", cid, 1), "the late attempt-1 message to be dropped")

    assert p.outbox.relay.publish([late]) == 1  # once more, after completion
    p.wait_for(lambda: len(dropped(p, worker, "work", cid, 1)) == 2, "the second late copy to be dropped")
    assert p.row(cid) == done  # nothing changed
    p.wait_drained(relay=True)
    ledger = p.ledger()
    assert ledger.attempts(cid, "start") == [2]


def test_redis_visibility_timeout_redelivery_does_not_rerun(lab) -> None:
    """Guarantee 3 on Redis: with late acks, a task running longer than the broker's visibility timeout (2 s)
    is redelivered by Redis; the redelivered copy finds the attempt already claimed and does not run the handler
    a second time for that attempt."""
    p = lab.project(
        "redis",
        broker_transport_options={
            "visibility_timeout": 2,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        task_acks_late=True,
        **STEADY_DISPATCH,
    )
    worker = p.start_worker(concurrency=2, wait_ready=False)
    p.start_beat()
    [cid] = p.push([p.cmd.work.s(0, seconds=4.0)], rollback=[p.cmd.work.s(-1)])

    p.wait_for(lambda: dropped(p, worker, "work", cid, 1), "Redis to redeliver the unacked message")
    p.wait_drained()
    ledger = p.ledger()
    assert worker.count(f"Task work[{cid}] received") >= 2
    assert ledger.attempts(cid, "start") == [1]
    assert ledger.attempts(cid, "done") == [1]


def test_cancel_while_the_broker_holds_the_message(lab) -> None:
    """Cancellation and guarantee 3: a command canceled after its message was published (no worker yet) is
    ``canceled`` at once with its ``if_canceled`` command; when a worker later consumes the message it is
    dropped, the handler never runs, and the chain is not enqueued a second time."""
    p = lab.project()
    target, other = p.push([p.cmd.work.s(0), p.cmd.work.s(1)], rollback=[p.cmd.work.s(-1)])
    assert p.outbox.relay_once() == 2
    p.wait_for(lambda: p.queue_depth() == 2, "both messages to wait in the broker")

    assert p.outbox.cancel(target) is True
    canceled = p.row(target)
    assert canceled is not None and (canceled["status"], canceled["outcome"]) == ("canceled", "canceled"), canceled
    assert [c.name for c in p.outbox.children(target)] == ["on_work_canceled"]
    assert p.outbox.cancel(target) is False  # already final: nothing more happens

    worker = p.start_worker(wait_ready=False)
    p.start_beat()
    p.wait_for(lambda: dropped(p, worker, "work", target, 1), "the canceled command's message to be dropped")
    p.wait_drained()
    ledger = p.ledger()
    assert ledger.attempts(target, "start") == []
    assert [(c["name"], c["status"]) for c in ledger.children(target)] == [("on_work_canceled", "completed")]
    assert ledger.row(other)["status"] == "completed"


def test_two_beats_dispatch_each_command_once(lab) -> None:
    """Guarantee 5: two ``celery beat`` processes (two listening relays and rescuers, different schedule
    files) claim with ``FOR UPDATE SKIP LOCKED``; every command is dispatched once (attempt 1), received by
    the worker once and completed once."""
    p = lab.project(**STEADY_DISPATCH)
    worker = p.start_worker(concurrency=2, wait_ready=False)
    beats = [p.start_beat(schedule="schedule-a", wait_ready=False), p.start_beat(schedule="schedule-b")]
    ids = []
    for batch in range(4):
        ids += p.push([p.cmd.work.s(10 * batch + i) for i in range(5)], rollback=[p.cmd.work.s(-1)])

    rows = p.wait_drained()
    ledger = p.ledger()
    assert len(rows) == 40  # 20 commands and their 20 chained commands
    log = worker.output()
    for row in rows:
        assert row["attempt"] == 1, row
        assert log.count(f"[{row['id']}] received") == 1, row
    assert "dropped" not in log
    assert all("listening relay started" in b.output() for b in beats)
    assert ledger.by_status() == {"completed": 40}


def test_hand_written_row_with_unregistered_name(lab, tmp_path: Path) -> None:
    """Guarantee 6: rows written into the table by hand with names no worker registered (one of them
    ``os.system``) make the worker import or call nothing: each attempt is recorded ``not_found`` and the
    command ends ``failed`` after its retries; a row naming a task that is not a command (the outbox's own
    relay task) is refused by the relay; the worker keeps running and other commands still flow."""
    p = lab.project(**STEADY_DISPATCH)
    worker = p.start_worker(wait_ready=False)
    p.start_beat()
    marker = tmp_path / "pwned"
    unknown = p.insert_raw(name="no_such_command", retries=1, retries_left=1, input={"x": 1})
    evil = p.insert_raw(name="os.system", retries=0, retries_left=0, input={"command": f"touch {marker}"})
    # A task the app does know, but that is no command: the relay must not turn the row into a message.
    service = p.insert_raw(name="orch_outbox.relay", retries=3, retries_left=3, input={})

    for cid, attempts in ((unknown, 2), (evil, 1)):
        row = p.wait_status(cid, "failed")
        assert (row["outcome"], row["error_type"], row["attempt"]) == ("not_found", "NotRegistered", attempts), row
        assert row["retries_left"] == 0 and row["started_at"] is None, row
    refused = p.wait_status(service, "failed")
    assert (refused["outcome"], refused["error_type"], refused["started_at"]) == ("not_found", "NotACommand", None)
    assert not marker.exists()

    [ok] = p.push([p.cmd.work.s(1)], rollback=[p.cmd.work.s(-1)])
    p.wait_drained()
    assert worker.alive()
    assert worker.count("Received unregistered task of type 'os.system'") == 1
    assert "orch_outbox.relay[" not in worker.output()  # never sent to a worker
    ledger = p.ledger()
    assert ledger.row(ok)["status"] == "completed"


class _Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


def test_pickle_message_is_refused(lab, tmp_path: Path) -> None:
    """Guarantee 6 (JSON only, never pickle): a pickle-serialised task message injected into the command
    queue — task name and outbox header of a real dispatched command — is refused before decoding; the row
    does not change, nothing runs, the worker keeps running, and the real message for that attempt, published
    afterwards, runs the command normally."""
    p = lab.project()
    [victim] = p.push([p.cmd.work.s(0)], rollback=[p.cmd.work.s(-1)])
    [claimed] = p.outbox.store.claim(10, 30.0)  # dispatched, attempt 1, its message not yet published
    before = p.row(victim)
    worker = p.start_worker(wait_ready=False)
    p.start_beat()

    marker = tmp_path / "pwned"
    with Connection(p.broker_url) as conn:
        Producer(conn.default_channel).publish(
            [(), {"n": _Evil(marker)}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
            routing_key=p.queue,
            serializer="pickle",
            headers={
                "lang": "py",
                "task": "work",
                "id": f"{victim}:1",
                "root_id": f"{victim}:1",
                "outbox": [str(victim), claimed.attempt, 10.0],
            },
        )
    p.wait_for(lambda: "untrusted content of type pickle" in worker.output(), "the worker to refuse the message")
    assert p.row(victim) == before  # still dispatched, attempt 1, untouched
    assert p.effects(command_id=victim) == []
    assert not marker.exists()

    assert p.outbox.relay.publish([claimed]) == 1  # the relay's real message for attempt 1
    [after] = p.push([p.cmd.work.s(1)])
    p.wait_drained()
    assert worker.alive()
    assert not marker.exists()
    ledger = p.ledger()
    assert (ledger.row(victim)["attempt"], ledger.row(victim)["retries_left"]) == (1, 2)
    assert ledger.row(after)["status"] == "completed"
