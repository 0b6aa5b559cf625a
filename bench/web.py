"""Section ``web``: the operator's page over a table of 100 000 commands, page by page.

The table gets 100 000 commands (``push_many``, COPY), then a mix of states is written
straight in SQL: 70 % completed, 10 % failed (with an error, a history row each), 15 %
pending (half due, half scheduled later), 5 % running. Each page is requested through the
WSGI app (Flask's test client: the app and its queries, no network) ``rounds`` times
after one warm-up; the median and the slowest are reported against 300 ms.
"""

from __future__ import annotations

import statistics
import time

from bench import common
from bench.app import build
from bench.common import BROKERS, Run, Section, Sizes, Target

ROWS = 100_000
REQUESTS = 15


def fill(bench: object, n: int) -> None:
    outbox = bench.outbox  # type: ignore[attr-defined]
    sig = bench.noop.s("web-bench")  # type: ignore[attr-defined]
    for start in range(0, n, 10_000):
        with outbox.engine.begin() as conn:
            outbox.push_many(conn, [sig.set(target=f"web-{start // 10_000 % 4}")] * min(10_000, n - start))
    t, a = outbox.store.table.name, f"{outbox.settings.table_prefix}attempts"
    common.pg_exec(
        f"UPDATE {t} SET status = CASE WHEN n % 100 < 70 THEN 'completed' WHEN n % 100 < 80 THEN 'failed' "
        "WHEN n % 100 < 95 THEN 'pending' ELSE 'running' END, "
        "attempt = CASE WHEN n % 100 < 95 AND n % 100 >= 80 THEN 0 ELSE 1 END, "
        "finished_at = CASE WHEN n % 100 < 80 THEN now() - (n % 3600) * interval '1 second' END, "
        "outcome = CASE WHEN n % 100 < 70 THEN 'success' WHEN n % 100 < 80 THEN 'failure' END, "
        "error_type = CASE WHEN n % 100 BETWEEN 70 AND 79 THEN 'ValueError' END, "
        "error_message = CASE WHEN n % 100 BETWEEN 70 AND 79 THEN 'feed ' || n || ' is not valid' END, "
        "scheduled_at = CASE WHEN n % 100 BETWEEN 88 AND 94 THEN now() + interval '1 hour' ELSE scheduled_at END, "
        "worker = CASE WHEN n % 100 >= 95 THEN 'w1@host' END, started_at = now() "
        f"FROM (SELECT id AS rid, row_number() OVER (ORDER BY id) AS n FROM {t}) numbered WHERE id = rid"
    )
    common.pg_exec(
        f"INSERT INTO {a} (command_id, attempt, worker, started_at, finished_at, outcome, error_type, error_message) "
        f"SELECT id, 1, 'w1@host', now(), now(), 'failure', error_type, error_message FROM {t} WHERE status = 'failed'"
    )
    common.pg_exec(f"ANALYZE {t}")


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    from orch_outbox.web import create_app

    rows = ROWS if sizes.mode != "quick" else 10_000
    bench = build(BROKERS["rabbitmq"], run.prefix("web"))
    bench.outbox.create_tables()
    try:
        fill(bench, rows)
        failed = common.pg_exec(
            f"SELECT id FROM {bench.outbox.store.table.name} WHERE status = 'failed' ORDER BY id LIMIT 1"
        )[0][0]
        client = create_app(bench.outbox).test_client()
        pages = {
            "overview": "/",
            "commands (newest 50)": "/commands",
            "dead letters": "/commands?status=failed",
            "search by error text": "/commands?error=feed+4242+is",
            "due order, page 100": "/commands?status=pending&sort=due&offset=5000",
            "one command with history": f"/commands/{failed}",
            "batches": "/batches",
            "schedules": "/schedules",
            "workers": "/workers",
        }
        section.setup.update(rows=rows, requests_per_page=REQUESTS, client="Flask test client (no network)")
        for label, path in pages.items():
            assert client.get(path).status_code == 200, path
            times = []
            for _ in range(REQUESTS):
                t0 = time.perf_counter()
                response = client.get(path)
                times.append((time.perf_counter() - t0) * 1000)
                assert response.status_code == 200, path
            section.metrics.append(
                common.Metric(
                    f"{label}: median (slowest {max(times):.0f} ms)",
                    statistics.median(times),
                    None,
                    "ms",
                    target=Target("value_max", 300.0, "≤ 300 ms"),
                )
            )
    finally:
        common.drop_outbox(bench.outbox)
