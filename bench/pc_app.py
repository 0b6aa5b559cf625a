"""procrastinate, the peer compared with: the same no-op job, in a PostgreSQL schema of its own.

procrastinate has no table prefix, so each run gives it a schema (``search_path``) that the
bench drops at the end. ``procrastinate --app=bench.pc_app.app worker`` imports this module
with ``BENCH_PC_SCHEMA`` set.
"""

from __future__ import annotations

import os
from typing import Any

import procrastinate

from bench.app import redis


def build(schema: str, database_url: str | None = None) -> tuple[procrastinate.App, Any]:
    """A procrastinate app whose tables live in ``schema``, and its no-op task."""
    url = database_url or os.environ.get("BENCH_DATABASE_URL", "postgresql://127.0.0.1/test")
    connector = procrastinate.PsycopgConnector(conninfo=url, kwargs={"options": f"-c search_path={schema}"})
    pc_app = procrastinate.App(connector=connector)

    @pc_app.task(name="pc_noop")
    def pc_noop(key: str) -> None:
        redis().incr(key)

    return pc_app, pc_noop


if os.environ.get("BENCH_PC_SCHEMA"):  # the worker subprocess
    app, noop = build(os.environ["BENCH_PC_SCHEMA"])
