"""Outages: the broker down at push time and during dispatch, PostgreSQL cut during write-backs, the worker's
PostgreSQL connections terminated server-side.

The shared servers are never stopped: outages happen in a :class:`~.proxy.Proxy` the
project's processes connect through, and ``pg_terminate_backend`` only ever targets the
connections of this test's worker (matched on their ``application_name``). Each scenario
ends with the ledger (``ledger.py``).
"""

from __future__ import annotations

import uuid

import pytest

from .harness import json_line, python

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]

#: Celery 5.7's worker, threads pool, with a task in flight when the broker connection drops: after the
#: reconnect it lowers the prefetch count and, restoring it, can block its event loop forever in a synchronous
#: basic.qos (seen here as: "Connected", then nothing consumed, main thread stuck in amqp read_frame under
#: asynloop -> qos.update -> basic_qos). Not orch_outbox's doing; the broker-outage scenarios turn the
#: reduction off so that they test the outbox, not that Celery defect.
CELERY_RECONNECT_WORKAROUND = {"worker_enable_prefetch_count_reduction": False}


def test_broker_down_during_push(lab) -> None:
    """Guarantee 1 (push needs only the database): while the broker is unreachable, a web process keeps pushing
    and committing commands (rolled-back ones never exist); they wait in the table and complete once the broker
    is back."""
    p = lab.project(**CELERY_RECONNECT_WORKAROUND)
    broker = lab.proxy("rabbitmq")
    p.start_worker(broker_port=broker.port, wait_ready=False)
    beat = p.start_beat(broker_port=broker.port)
    broker.down()

    # The user's web process, whose Celery app points at the dead broker too.
    pushed = p.run(
        [python(), "push.py", p.db_url("web"), "6"],
        env={"CELERY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{broker.port}//"},
    )
    assert pushed.returncode == 0, pushed
    out = json_line(pushed.stdout)
    ids = [uuid.UUID(i) for i in out["committed"]]
    p.committed += ids
    p.rolled_back += [uuid.UUID(i) for i in out["rolled_back"]]
    assert max(out["seconds"]) < 2.0, out  # no broker wait in a push
    assert all(p.row(i) is not None for i in ids)

    p.wait_for(lambda: "broker unavailable" in beat.output(), "the relay to find the broker down")
    assert all(p.row(i)["status"] in ("pending", "dispatched") for i in ids)
    broker.restore()
    p.wait_drained()
    ledger = p.ledger()
    assert all(ledger.row(i)["retries_left"] == 2 for i in ids)  # the outage consumed no retry


def test_broker_down_during_dispatch(lab) -> None:
    """Guarantee 2 (broker outage): while the broker is cut and refusing connections, the relay's publishes fail,
    it logs and returns the claimed rows to ``pending`` (no retry consumed) and backs off; after the broker is
    restored everything drains, each command executed once."""
    p = lab.project(**CELERY_RECONNECT_WORKAROUND)
    broker = lab.proxy("rabbitmq")
    p.start_worker(broker_port=broker.port, wait_ready=False)
    beat = p.start_beat(broker_port=broker.port)
    before = p.push([p.cmd.work.s(i) for i in range(3)])
    p.wait_for(lambda: all(p.row(i)["status"] == "completed" for i in before), "the first commands to complete")

    assert broker.down() >= 2  # the worker's and the relay's connections, at least
    during = p.push([p.cmd.work.s(i) for i in range(10, 16)], rollback=[p.cmd.work.s(-1)])

    def returned() -> bool:
        rows = [p.row(i) for i in during]
        return "broker unavailable" in beat.output() and all(
            r["status"] == "pending" and r["attempt"] >= 1 and r["retries_left"] == 2 for r in rows
        )

    p.wait_for(returned, "the relay to fail, log, and return the claimed rows to pending")
    assert broker.refused >= 1
    broker.restore()
    p.wait_drained()
    ledger = p.ledger()
    for cid in during:
        row = ledger.row(cid)
        assert row["retries_left"] == 2 and row["attempt"] >= 2, row  # redispatched, no retry consumed
        assert ledger.attempts(cid, "start") == [row["attempt"]]


def test_postgres_cut_during_write_back(lab) -> None:
    """Guarantee 2 (database outage) and at-most-once per attempt: the worker's PostgreSQL connections are cut
    (and new ones refused) while handlers run; their write-backs fail and are retried with backoff; once the
    database is back the rows complete, and no handler ran a second time."""
    p = lab.project()
    pg = lab.proxy("postgres")
    worker = p.start_worker(concurrency=3, db_port=pg.port, wait_ready=False)
    p.start_beat()
    ids = p.push([p.cmd.work.s(i, seconds=1.0, chain=False) for i in range(3)], rollback=[p.cmd.work.s(-1)])
    p.wait_for(lambda: len(p.effects("start")) == 3, "the three handlers to start")

    assert pg.down() >= 1
    # Handlers finish (their side effect goes to its own connection) and the write-backs start failing.
    p.wait_for(lambda: len(p.effects("done")) == 3, "the handlers to finish")
    # The three successes are written back together (the worker's write-behind) or one by one.
    p.wait_for(
        lambda: worker.count("); retrying in 0.50s") >= 1,
        "the write-backs to fail three times (the third try waits 0.5 s)",
    )
    assert all(p.row(i)["status"] == "running" for i in ids)
    pg.restore()

    p.wait_drained()
    ledger = p.ledger()
    for cid in ids:
        row = ledger.row(cid)
        assert (row["status"], row["attempt"], row["retries_left"]) == ("completed", 1, 2), row
        assert ledger.attempts(cid, "start") == [1] and ledger.attempts(cid, "done") == [1]


def test_worker_connections_terminated_by_postgres(lab) -> None:
    """Guarantees 2 and 3 under a database restart: PostgreSQL terminates the worker's and beat's connections
    (``pg_terminate_backend``, three times during a batch); the worker reconnects and retries its writes, the
    listening relay reconnects, and every command still completes with its side effect and its chained command
    exactly once."""
    p = lab.project()
    worker = p.start_worker(concurrency=3, wait_ready=False)
    p.start_beat()
    node = p.node(0)
    # A short timeout keeps the running lease short, should a kill hit the claim's commit acknowledgement.
    ids = p.push([p.cmd.work.options(timeout=3).s(i, seconds=0.3) for i in range(12)], rollback=[p.cmd.work.s(-1)])

    terminated = 0
    for progress in (2, 6, 10):
        p.wait_for(lambda n=progress: len(p.effects("done")) >= n, f"{progress} side effects")
        terminated += p.terminate_backends(node)
        terminated += p.terminate_backends(f"fb0-{p.token}")  # beat's too: its LISTEN connection included
    assert terminated >= 6

    p.wait_drained()
    ledger = p.ledger()
    assert ledger.by_status() == {"completed": 24}
    assert all(len(ledger.attempts(c, "done")) == 1 for c in ids)
    assert "outbox database unavailable" in worker.output()
