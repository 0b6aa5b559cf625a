"""Section ``notify``: what the NOTIFY of a push costs the application's own commits, at 32 concurrent committers.

32 processes each insert one command row per transaction (one INSERT into the outbox table,
its trigger, and a commit; straight over psycopg, so that the pushers' own Python does not
hide the database's side on this 2-core machine) for a few seconds; commits per second over
all of them, three ways:

- ``always``: every push notifies (the trigger as it was: a notifying transaction takes a
  cluster-wide lock at commit, so the commits line up);
- ``idle`` (the default): a push notifies only while a relay waits for it; a relay runs
  throughout and is kept busy by the pushes, so they do not notify;
- ``never``: no notification at all; the relay polls every ``BUSY_POLL`` seconds, the
  cadence at which the busy relay of ``idle`` claims, so that the two runs differ by the
  NOTIFY alone and not by how often a relay claims beside the pushers (a relay polling once
  a second claims fifty times less often, which on two cores leaves the pushers more CPU).

The rounds alternate (always, idle, never, ...); the best of each counts.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from bench import common
from bench.common import Run, Section, Sizes, Target
from orch_outbox.listener import BUSY_POLL

PUSHERS = 32


def pusher(prefix: str, seconds: float, start_at: float, out: Any) -> None:
    """One application process: one command row per transaction, straight over psycopg (the pushes' own
    Python would hide the database's side on this 2-core machine)."""
    import uuid

    import psycopg

    sql = (
        f"INSERT INTO {prefix}commands (id, name, target, input, retries, retries_left, timeout, scheduled_at, "
        "created_at) VALUES (%s, 'notify_noop', 'notify-q', '{}', 0, 0, 60, now(), now())"
    )
    with psycopg.connect(common.DB_URL) as conn:
        while time.time() < start_at:
            time.sleep(0.005)
        done, end = 0, time.time() + seconds
        while time.time() < end:
            conn.execute(sql, (uuid.uuid4(),), prepare=True)
            conn.commit()
            done += 1
    out.put(done)


def commits_per_second(prefix: str, seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 2.0
    procs = [ctx.Process(target=pusher, args=(prefix, seconds, start_at, out)) for _ in range(PUSHERS)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join(30)
    return total / seconds


def with_mode(run: Run, mode: str, seconds: float) -> float:
    """Commits per second of the pushers, with a listening relay in ``mode`` running beside them."""
    import threading

    from celery import Celery

    from orch_outbox import Outbox

    prefix = run.prefix(f"nt{mode[:2]}")
    app = Celery("bench-notify-relay", broker="memory://", set_as_current=False)
    poll = BUSY_POLL if mode == "never" else 1.0  # the busy relay's cadence (see the module docstring)
    outbox = Outbox(app, common.DB_URL, table_prefix=prefix, notify=mode, poll_interval=poll, max_in_flight=0)
    outbox.create_tables()
    outbox.relay.publish = lambda batch: len(batch)  # type: ignore[method-assign]  # claims, no broker: the DB side
    stop = threading.Event()
    relay = outbox.listening_relay(stop)
    relay.start()
    try:
        return commits_per_second(prefix, seconds)
    finally:
        relay.close()
        common.drop_outbox(outbox)


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    seconds = 3.0 if sizes.mode == "quick" else 6.0
    modes = ("always", "idle", "never")
    best = dict.fromkeys(modes, 0.0)
    for _ in range(sizes.rounds):
        for mode in modes:
            best[mode] = max(best[mode], with_mode(run, mode, seconds))
    relay = f"listening, claims only; without NOTIFY it polls every {BUSY_POLL:g} s, as a busy listening relay does"
    section.setup.update(pushers=PUSHERS, seconds=seconds, rounds=sizes.rounds, relay=relay)
    section.metrics += [
        common.Metric("commits/s, every push notifies", best["always"], best["never"], "tx/s", "no NOTIFY"),
        common.Metric(
            "commits/s, notify only an idle relay (default)",
            best["idle"],
            best["never"],
            "tx/s",
            "no NOTIFY",
            Target("ratio_min", 0.9, "≥ 0.9x"),
        ),
    ]
    section.notes.append(
        "a transaction that notified takes a cluster-wide lock at commit; the default notifies only while a relay "
        "waits for it, and a relay kept busy by pushes (over 500 a second) polls every 20 ms instead"
    )
