"""Behind a real PgBouncer (Debian's package): pushers in transaction pooling, the listening relay in session pooling.

Each test starts its own ``pgbouncer`` on a free loopback port in front of the local
PostgreSQL (trust auth), in the pool mode the test needs, and stops it after. In
transaction pooling a client's statements may run on a different server connection at
every transaction, so what a session remembers (prepared statements, SET, LISTEN) is not
available: pushers turn psycopg's automatic prepared statements off
(``connect_args={"prepare_threshold": None}``), as docs/operations.md says. LISTEN needs
the same server connection for as long as it waits: the relay goes through session
pooling (or straight to PostgreSQL).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.orm import Session

from orch_outbox import Outbox
from orch_outbox.store import make_engine
from orch_outbox.testing import wait_until

from conftest import unique_prefix
from support.procs import free_port

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")

pytestmark = [pytest.mark.pg, pytest.mark.skipif(PGBOUNCER is None, reason="Debian's pgbouncer is not installed")]

CONFIG = """\
[databases]
test = host=127.0.0.1 port=5432 dbname=test
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root}/users.txt
pool_mode = {mode}
max_client_conn = 200
default_pool_size = 4
ignore_startup_parameters = extra_float_digits,options
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
"""


@pytest.fixture
def bouncer() -> Iterator[Callable[[str], str]]:
    """``bouncer(mode)``: a running PgBouncer in that pool mode; returns its SQLAlchemy URL.

    Its files live in a folder of their own under /tmp that the ``postgres`` user can read
    (PgBouncer, started as root, drops to that user; pytest's own tmp folders are private).
    """
    started: list[subprocess.Popen[bytes]] = []
    base = Path(tempfile.mkdtemp(prefix="orch-pgbouncer-"))
    os.chmod(base, 0o755)

    def start(mode: str) -> str:
        root = base / mode
        root.mkdir()
        os.chmod(root, 0o777)
        port = free_port()
        (root / "users.txt").write_text('"postgres" ""\n')
        (root / "pgbouncer.ini").write_text(CONFIG.format(port=port, root=root, mode=mode))
        for name in ("users.txt", "pgbouncer.ini"):
            os.chmod(root / name, 0o644)
        assert PGBOUNCER is not None
        argv = [PGBOUNCER, str(root / "pgbouncer.ini")]
        if os.geteuid() == 0:
            argv[1:1] = ["-u", "postgres"]  # PgBouncer refuses to run as root
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(proc)
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"

        def answers() -> bool:
            try:
                with sa.create_engine(url, poolclass=sa.pool.NullPool).connect() as conn:
                    return conn.execute(sa.text("SELECT 1")).scalar_one() == 1
            except sa.exc.OperationalError:
                assert proc.poll() is None, f"pgbouncer exited: {(root / 'pgbouncer.log').read_text()}"
                return False

        wait_until(answers, 20, what=f"pgbouncer ({mode}) to answer")
        return url

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(base, ignore_errors=True)


def test_pushers_behind_transaction_pooling(bouncer: Callable[[str], str], pg_engine: sa.Engine) -> None:
    """Proves pushes work through PgBouncer in transaction mode: 8 threads x 20 pushes, each in its own transaction
    (more than psycopg's 5 executions before it would prepare), all committed; a rolled-back one is not there."""
    url = bouncer("transaction")
    prefix = unique_prefix()
    direct = Outbox(Celery("pgb", broker="memory://", set_as_current=False), pg_engine, table_prefix=prefix)
    direct.create_tables()
    pooled_engine = make_engine(url, connect_args={"prepare_threshold": None}, pool_size=8)
    pooled = Outbox(Celery("pgb-app", broker="memory://", set_as_current=False), pooled_engine, table_prefix=prefix)

    @pooled.command(name="ping", target="pgb-q")
    def ping(n: int) -> int:
        return n

    errors: list[BaseException] = []

    def push_some(k: int) -> None:
        try:
            for i in range(20):
                with Session(pooled_engine) as session, session.begin():
                    ping.push(session, k * 100 + i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=push_some, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    with Session(pooled_engine) as session:
        ping.push(session, -1)
        session.rollback()
    assert direct.store.count(target="pgb-q") == 160
    pooled_engine.dispose()
    direct.store.drop_all()


def test_listening_relay_behind_session_pooling(bouncer: Callable[[str], str], pg_engine: sa.Engine) -> None:
    """Proves LISTEN/NOTIFY through PgBouncer in session mode: with a 120 s poll interval, a push committed
    through transaction pooling is published within seconds by a relay whose outbox goes through session pooling."""
    session_url, transaction_url = bouncer("session"), bouncer("transaction")
    prefix = unique_prefix()
    relay_engine = make_engine(session_url)
    outbox = Outbox(
        Celery("pgb-relay", broker="memory://", set_as_current=False),
        relay_engine,
        table_prefix=prefix,
        poll_interval=120.0,
        rescue_interval=120.0,
    )
    outbox.create_tables()
    published: list[str] = []
    outbox.relay._send = lambda _producer, item, retry=True: published.append(str(item.id))  # type: ignore[method-assign]

    @outbox.command(name="ping", target="pgb-listen")
    def ping(n: int) -> int:
        return n

    pusher_engine = make_engine(transaction_url, connect_args={"prepare_threshold": None})
    relay = outbox.listening_relay()
    relay.start()
    try:
        wait_until(lambda: relay.passes >= 1 and relay.listening.is_set(), 20, what="the relay to listen")
        with Session(pusher_engine) as session, session.begin():
            command_id = ping.push(session, 1)
        wait_until(lambda: str(command_id) in published, 15, what="the notified relay to publish")
    finally:
        relay.close()
        pusher_engine.dispose()
        outbox.store.drop_all()
        outbox.close()
        relay_engine.dispose()
