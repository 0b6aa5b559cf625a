"""Crashes: workers killed (-9, poison, SIGTERM), relays killed around the publish, handlers past their timeout.

Each scenario runs real ``celery -A orch_outbox worker`` / ``beat`` subprocesses (see
``harness.py``) and ends with the ledger (``ledger.py``).
"""

from __future__ import annotations

import pytest

from .harness import STEADY_DISPATCH, FaultProject, json_line, python

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]


def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (it does not exist, or is a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _all(project: FaultProject, ids: list, **expected: object) -> list[dict] | None:
    """The rows of ``ids`` if every one of them has the ``expected`` column values, else None."""
    rows = [project.row(i) for i in ids]
    ok = all(r is not None and all(r[k] == v for k, v in expected.items()) for r in rows)
    return rows if ok else None  # type: ignore[return-value]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_worker_killed_mid_task_completes_on_another_worker(lab, pool: str) -> None:
    """Guarantee 2 (a worker crash, ``kill -9``, loses nothing) and 3 (the lapsed lease is settled by a fenced
    write): the command a killed worker was running is rescued when its running lease (timeout + lock buffer)
    lapses, counted as a lost attempt, and completes on a second worker; killed before its side effect, the
    effect happens once; killed after it but before the write-back, it reruns (the documented at-least-once)."""
    p = lab.project()
    first = p.start_worker(pool=pool, concurrency=2, wait_ready=False)
    beat = p.start_beat()
    # Short timeouts keep the running leases (timeout + 1 s lock buffer) short: any command the kill
    # catches mid-run (the quick ones too) is rescued within seconds.
    [slow] = p.push([p.cmd.work.options(timeout=4).s(0, seconds=2.5)], rollback=[p.cmd.work.s(-1)])
    # This one has made its side effect and not yet written back when the worker dies: at-least-once.
    [lingering] = p.push([p.cmd.work.options(timeout=3.5).s(1, after=2.5)])
    quick = p.push([p.cmd.work.options(timeout=2).s(i) for i in range(2, 5)])
    [started] = p.wait_for(lambda: p.effects("start", slow), "the slow handler to start")
    p.wait_for(lambda: p.effects("done", lingering), "the lingering handler's side effect")

    first.kill()  # the whole process group: main process and pool children, as an OOM kill or a lost host
    row = p.row(slow)
    assert row is not None and (row["status"], row["attempt"]) == ("running", 1), row
    assert row["worker"].startswith(p.node(0)), row
    p.wait_for(lambda: gone(started["pid"]), "the process that ran attempt 1 to die", timeout=10)

    p.start_worker(pool=pool, concurrency=2)
    done = p.wait_status(slow, "completed")
    # The lost attempt consumed one retry. (While no worker consumes — the second one may take seconds to
    # start on a loaded machine — a redispatch after a lapsed dispatch lease may add attempts, never retries.)
    assert done["retries_left"] == done["retries"] - 1, done
    assert done["attempt"] >= 2, done
    assert done["worker"].startswith(p.node(1)), done
    assert "rescuer: settled" in beat.output()
    p.wait_drained()
    ledger = p.ledger(at_least_once=[lingering])
    assert ledger.attempts(slow, "start") == [1, done["attempt"]]
    assert ledger.attempts(slow, "done") == [done["attempt"]]  # killed before its side effect: it happened once
    again = ledger.row(lingering)
    assert ledger.attempts(lingering, "done") == [1, again["attempt"]]  # killed after it: rerun, as documented
    assert again["retries_left"] == again["retries"] - 1, again
    assert all(ledger.row(q)["status"] == "completed" for q in quick)


def test_relay_killed_between_claim_and_publish(lab) -> None:
    """Guarantee 2 (relay crash after its claim commit): rows claimed by a relay that died before publishing
    sit ``dispatched`` with no message; when the dispatch lease lapses the rescuer returns them to ``pending``
    without consuming a retry, and they complete (attempt 2, retries untouched)."""
    p = lab.project()
    ids = p.push([p.cmd.work.s(i) for i in range(5)], rollback=[p.cmd.work.s(-1)])

    crashed = p.run([python(), "relay_crash.py", "before"])
    assert crashed.returncode == 137, crashed
    assert sorted(json_line(crashed.stdout)) == sorted([str(i), 1] for i in ids)
    rows = _all(p, ids, status="dispatched", attempt=1)
    assert rows is not None, p.report()
    assert p.queue_depth() == 0  # claimed and committed, never published
    p.start_worker(wait_ready=False)  # comes up while the leases run out (nothing to consume meanwhile)

    # The rescuer (what beat runs every outbox_rescue_interval) settles the lapsed dispatch leases.
    def released() -> list[dict] | None:
        p.outbox.rescue_once()
        return _all(p, ids, status="pending", attempt=1, retries_left=2, outcome=None)

    p.wait_for(released, "the dispatch leases to lapse and the rows to return to pending", timeout=15)
    p.start_beat()
    p.wait_drained()
    ledger = p.ledger()
    for cid in ids:
        row = ledger.row(cid)
        assert row["attempt"] >= 2 and row["retries_left"] == 2, row  # redispatched, no retry consumed
        assert ledger.attempts(cid, "start") == [row["attempt"]]


def test_relay_killed_right_after_publish(lab) -> None:
    """Guarantees 2 and 3 (relay crash after its publish): the messages a relay published before dying are
    consumed once; nothing is duplicated or redispatched, every command completes at attempt 1."""
    p = lab.project(**STEADY_DISPATCH)
    worker = p.start_worker(wait_ready=False)  # (messages wait in the queue until it is up)
    ids = p.push([p.cmd.work.s(i) for i in range(5)], rollback=[p.cmd.work.s(-1)])

    crashed = p.run([python(), "relay_crash.py", "after"])
    assert crashed.returncode == 137, crashed
    assert sorted(json_line(crashed.stdout)) == sorted([str(i), 1] for i in ids)  # all published, then died
    p.wait_ready()
    p.wait_for(lambda: _all(p, ids, status="completed", attempt=1), "the published commands to complete")

    p.start_beat()  # relays the chained commands
    p.wait_drained()
    ledger = p.ledger()
    log = worker.output()
    for cid in ids:
        assert log.count(f"Task work[{cid}] received") == 1, log
        assert f"work[{cid}:2]" not in log
    assert "dropped work" not in log
    assert all(ledger.row(c)["retries_left"] == 2 for c in ids)


def test_poison_command_fails_after_bounded_attempts(lab) -> None:
    """Guarantee 2 (bounded, no endless loop): a command whose handler kills its pool process every time is
    counted as a lost attempt each time its lease lapses and ends ``failed`` after retries + 1 attempts; its
    ``if_failed`` command is enqueued exactly once; the worker survives and keeps running other commands."""
    p = lab.project(**STEADY_DISPATCH)
    worker = p.start_worker(pool="prefork", concurrency=2, wait_ready=False)
    p.start_beat()
    [bad] = p.push([p.cmd.poison.s(7)], rollback=[p.cmd.poison.s(-1)])

    failed = p.wait_status(bad, "failed")
    assert (failed["attempt"], failed["retries_left"], failed["outcome"]) == (3, 0, "lost"), failed
    assert failed["error_type"] == "LeaseExpired", failed

    [ok] = p.push([p.cmd.work.s(1)])
    p.wait_drained()
    assert worker.alive()
    ledger = p.ledger()
    assert ledger.attempts(bad, "start") == [1, 2, 3]
    [child] = ledger.children(bad)
    assert (child["name"], child["status"]) == ("on_poison_failed", "completed"), child
    assert ledger.row(ok)["status"] == "completed"
    assert worker.count("exitcode 3") >= 3, worker.output()  # the pool lost a process each time


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_warm_shutdown_finishes_the_running_command(lab, pool: str) -> None:
    """Guarantee 2 (no loss on a deploy): SIGTERM (warm shutdown) lets the running handler finish and its
    outcome be written before the worker exits; what it had not started runs on the next worker."""
    p = lab.project()
    worker = p.start_worker(pool=pool, concurrency=1, wait_ready=False)
    p.start_beat()
    [running] = p.push([p.cmd.work.s(0, seconds=2.0)], rollback=[p.cmd.work.s(-1)])
    p.wait_for(lambda: p.effects("start", running), "the handler to start")
    waiting = p.push([p.cmd.work.s(i) for i in range(1, 3)])

    signaled_at = p.db_now()
    worker.terminate()
    p.start_worker(pool=pool)  # the next worker comes up while the first one shuts down
    assert worker.wait_exit(timeout=30) == 0, worker.output()
    row = p.row(running)
    assert row is not None and (row["status"], row["attempt"]) == ("completed", 1), row
    assert row["worker"].startswith(p.node(0)), row
    assert "Warm shutdown" in worker.output()
    [done] = p.effects("done", running)
    assert done["db_time"] > signaled_at  # the handler was still running when SIGTERM arrived

    p.wait_drained()
    ledger = p.ledger()
    assert ledger.attempts(running, "done") == [1]
    assert all(ledger.row(w)["status"] == "completed" for w in waiting)


def test_handler_timeout_in_prefork_pool(lab) -> None:
    """Retries (contract: a timeout consumes one) and guarantee 4: a prefork handler running past its timeout
    is interrupted, the attempt is recorded with outcome ``timeout`` and retried; after the last retry the
    command is ``failed`` (outcome ``timeout``) with its ``if_failed`` command, once."""
    p = lab.project(**STEADY_DISPATCH)
    p.start_worker(pool="prefork", concurrency=2, wait_ready=False)
    p.start_beat()
    [slow] = p.push([p.cmd.work.options(timeout=1, retries=1).s(0, seconds=8.0)], rollback=[p.cmd.work.s(-1)])
    [quick] = p.push([p.cmd.work.options(timeout=5, retries=1).s(1, seconds=0.1)])

    retried = p.wait_for(
        lambda: (r := p.row(slow)) and r["outcome"] == "timeout" and r["retries_left"] == 0 and r,
        "the first attempt to be recorded as timed out and retried",
    )
    assert retried["error_type"] == "CommandTimeout", retried
    failed = p.wait_status(slow, "failed")
    assert (failed["attempt"], failed["outcome"], failed["error_type"]) == (2, "timeout", "CommandTimeout"), failed
    assert "timeout of 1s" in failed["error_message"]

    p.wait_drained()
    ledger = p.ledger()
    assert ledger.attempts(slow, "start") == [1, 2]
    assert ledger.attempts(slow, "done") == []
    assert [c["name"] for c in ledger.children(slow)] == ["on_work_failed"]
    assert ledger.row(quick)["status"] == "completed"


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_handler_stuck_past_its_timeout_never_overlaps_its_next_attempt(lab, pool: str) -> None:
    """Guarantee 9 (no overlapping attempts while workers live): a handler blocked in one C call
    (``time.sleep``) far past its 1 s timeout - and past timeout + lock buffer, when a lease that nothing
    renews would lapse - is never joined by a second attempt. Prefork: the watchdog records the timeout
    ``outbox_timeout_grace`` after it and ends the pool process, and attempt 2 starts only once that
    process is gone. Threads (a thread cannot be stopped): the worker keeps the lease while the thread is
    still inside the handler, and records the timeout when it returns; attempt 2 starts after that. The
    ledger of start/end times shows it; the parent worker survives."""
    p = lab.project(
        outbox_lock_buffer=1.0,
        outbox_timeout_grace=2.0,
        outbox_retry_backoff="fixed",
        outbox_retry_backoff_base=0.0,
        **STEADY_DISPATCH,
    )
    worker = p.start_worker(pool=pool, concurrency=2)
    p.start_beat()
    [cid] = p.push([p.cmd.stuck.s(0, seconds=20.0 if pool == "prefork" else 6.0)])
    done = p.wait_status(cid, "completed", timeout=45)
    ledger = p.ledger(at_least_once=[cid])
    effects = sorted((e for e in ledger.effects if e["command_id"] == done["id"]), key=lambda e: e["db_time"])
    phases = [(e["attempt"], e["phase"]) for e in effects]
    first_start = next(e for e in effects if (e["attempt"], e["phase"]) == (1, "start"))
    second_start = next(e for e in effects if (e["attempt"], e["phase"]) == (2, "start"))
    elapsed = (second_start["db_time"] - first_start["db_time"]).total_seconds()
    print(f"\n{pool}: attempt 2 started {elapsed:.1f}s after attempt 1 (timeout 1 s)")
    assert (2, "overlap") not in phases and (2, "alone") in phases, phases
    assert done["attempt"] == 2 and done["retries_left"] == 0, done
    if pool == "prefork":
        assert (1, "done") not in phases, phases  # its process was ended mid-sleep
        assert elapsed >= 1.0 + 2.0, elapsed  # not before timeout + grace
    else:
        first_done = next(e for e in effects if (e["attempt"], e["phase"]) == (1, "done"))
        assert second_start["db_time"] > first_done["db_time"], phases
    assert worker.alive()
