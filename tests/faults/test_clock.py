"""A worker host whose clock is wrong by an hour.

The worker subprocess runs with a ``sitecustomize`` (on its ``PYTHONPATH``) that shifts
``time.time()``, ``time.time_ns()`` and ``datetime.now()`` / ``utcnow()`` by the offset;
the handlers record ``time.time()`` next to the database's clock, so each test first
proves the skew is real. Leases must come from the database clock.
"""

from __future__ import annotations

import datetime as dt

import pytest

from .harness import SKEW_SITECUSTOMIZE, STEADY_DISPATCH, FaultProject, Proc

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]


def skewed_worker(project: FaultProject, offset: float) -> Proc:
    folder = project.root / f"skew{int(offset)}"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SKEW_SITECUSTOMIZE.format(offset=offset))
    return project.start_worker(env={"PYTHONPATH": str(folder)}, wait_ready=False)


def assert_skewed(effect: dict, offset: float) -> None:
    """The handler's host clock really is off by ``offset`` against the database clock."""
    measured = effect["host_time"] - effect["db_time"].timestamp()
    assert abs(measured - offset) < 5, (measured, offset)


@pytest.mark.parametrize("offset", [3600.0, -3600.0], ids=["ahead", "behind"])
def test_skewed_worker_clock_leases_from_database(lab, offset: float) -> None:
    """Guarantees 2 and 3 with a wrong host clock: the running lease a worker takes is computed by the database
    (now() + timeout + lock buffer), so a worker an hour behind is not rescued prematurely (its attempt 1
    completes, no retry consumed) and one an hour ahead does not hold the command for an extra hour."""
    p = lab.project(**STEADY_DISPATCH)
    skewed_worker(p, offset)
    p.start_beat()
    [cid] = p.push([p.cmd.work.options(timeout=5).s(0, seconds=2.0, chain=False)], rollback=[p.cmd.work.s(-1)])

    [start] = p.wait_for(lambda: p.effects("start", cid), "the handler to start")
    assert_skewed(start, offset)
    running = p.row(cid)
    assert running is not None and running["status"] == "running", running
    lease = (running["lease_expires_at"] - running["started_at"]).total_seconds()
    assert lease == pytest.approx(5 + 1, abs=0.5), running  # timeout + lock buffer, from the database clock
    assert abs((running["started_at"] - p.db_now()).total_seconds()) < 5, running

    done = p.wait_status(cid, "completed", "failed")
    assert (done["status"], done["attempt"], done["retries_left"]) == ("completed", 1, 2), done
    p.wait_drained()
    p.ledger()


def test_skewed_worker_clock_does_not_delay_chained_commands(lab) -> None:
    """Guarantees 2 and 4 with a host clock an hour ahead: the command chained by a worker's write-back is due
    at once (by the database clock) and completes, instead of waiting out the worker's skew. (Found by this
    suite: chained rows used to be stamped with the worker's Python clock; fixed in 690add9.)"""
    p = lab.project()
    skewed_worker(p, 3600.0)
    p.start_beat()
    [cid] = p.push([p.cmd.work.s(0)], rollback=[p.cmd.work.s(-1)])
    p.wait_status(cid, "completed")
    [child] = p.outbox.children(cid)
    due_in = (child.scheduled_at - p.db_now()).total_seconds()
    assert due_in < 5, f"the chained command is due in {dt.timedelta(seconds=due_in)}"
    p.wait_drained(timeout=15)
    p.ledger()
