"""``outbox_read_database_url``: the operator's reads go to a standby; claims, pushes and actions never do.

A primary and an asynchronous streaming standby (``support/pgpair.py``). The standby's
replay is paused, so what it shows lags the primary by the commands pushed since: a read
that answers with the older figure came from the standby, one with the newer from the
primary.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from orch_outbox.cli import main
from orch_outbox.testing import wait_until

from support import pgpair

pytestmark = [
    pytest.mark.ha,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not pgpair.available(), reason="PostgreSQL server binaries are not installed"),
]

APP = """\
from celery import Celery
from orch_outbox import Outbox

app = Celery("ha-reads", broker="memory://", set_as_current=False)
outbox = Outbox(app, {primary!r}, table_prefix="reads_", read_database_url={standby!r})


@outbox.command(name="ping", target="reads-q")
def ping(n: int) -> int:
    return n
"""


@pytest.fixture
def pair() -> Iterator[pgpair.PgPair]:
    started = pgpair.PgPair.start(synchronous=False)
    yield started
    started.stop()


def standby_count(outbox: Any) -> int:
    """Rows the standby shows; -1 while it has not replayed the tables' creation yet (it replays asynchronously)."""
    try:
        return int(outbox.reads.store.count())
    except sa.exc.ProgrammingError:
        return -1


def test_reads_go_to_the_standby_and_writes_to_the_primary(
    pair: pgpair.PgPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves the routing: with the standby's replay paused, `orch-outbox status` and `list` (and the outbox's
    `reads`) show the standby's older figures, while pushes, the relay's claim and `orch-outbox cancel` act on the
    primary; once replay resumes the reads catch up."""
    (tmp_path / "ha_reads.py").write_text(APP.format(primary=pair.primary_url, standby=pair.standby_url))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import ha_reads  # type: ignore[import-not-found]

    outbox = ha_reads.outbox
    outbox.create_tables()
    for i in range(3):
        ha_reads.ping.push(outbox.engine, i)
    wait_until(lambda: standby_count(outbox) == 3, 30, what="the standby to replay the tables and the first pushes")
    pair.standby.sql("SELECT pg_wal_replay_pause()")
    late = [ha_reads.ping.push(outbox.engine, 10 + i) for i in range(2)]
    assert outbox.store.count() == 5 and outbox.reads.store.count() == 3

    runner = CliRunner()
    status = runner.invoke(main, ["-A", "ha_reads:outbox", "status", "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout) == {"reads-q": {"pending": 3}}
    listed = runner.invoke(main, ["-A", "ha_reads:outbox", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert str(late[0]) not in listed.output
    canceled = runner.invoke(main, ["-A", "ha_reads:outbox", "cancel", str(late[0])])
    assert canceled.exit_code == 0, canceled.output  # an action: on the primary, which has the command
    assert outbox.get(late[0]).status == "canceled"
    assert len(outbox.store.claim(10, 60)) == 4  # the claim reads the primary: 3 + the one not canceled

    pair.standby.sql("SELECT pg_wal_replay_resume()")
    wait_until(lambda: outbox.reads.store.count(status="dispatched") == 4, 30, what="the standby to catch up")
    outbox.close()
    outbox.reads.store.close()
    sys.modules.pop("ha_reads", None)
