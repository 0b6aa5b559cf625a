"""The FastAPI shop end to end, on PostgreSQL and RabbitMQ: orders placed through the API, confirmed by a worker.

It creates the database if it does not exist and the ``orders`` table, migrates the outbox
(``orch-outbox -A shop:outbox migrate``), starts ``celery -A shop worker -Q <queue>`` and
``celery -A shop beat`` in this folder, then calls the API in-process (httpx's ASGITransport):
an order through the sync endpoint, one through the async endpoint, and one of each over the
stock, refused after their push. It waits (bounded) until the two commands are final and exits
0 only if both completed (read back with ``outbox.get``), both orders are confirmed, and the
refused orders left neither an order nor a command.

Environment: ``DATABASE_URL``, ``BROKER_URL``, ``ORDERS_QUEUE`` (see shopconfig.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: The longest wait for the commands to be final, in seconds.
WAIT = 60.0
#: The longest wait for a stopped process to exit before it is killed.
STOP_GRACE = 10.0


class Services:
    """``celery -A shop`` subprocesses run in this folder, each in a process group of its own, output in a log."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str, *args: str) -> None:
        print(f"$ celery -A shop {' '.join(args)} &   (log: {self.logs / role}.log)")
        with (self.logs / f"{role}.log").open("wb") as log:
            self.procs[role] = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "shop", *args],
                cwd=HERE,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def check(self) -> None:
        """Raise if one of them exited: nothing would run the commands."""
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{role}.log").read_text(errors="replace").splitlines()[-40:]
                raise RuntimeError(f"{role} exited with {proc.returncode}:\n" + "\n".join(tail))

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown), a bounded wait, then SIGKILL of each process group."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its group
            proc.wait(timeout=STOP_GRACE)


def cli(*args: str) -> str:
    """Run ``orch-outbox ARGS`` in this folder, as a user would; its output, or raise if it failed."""
    print(f"$ orch-outbox {' '.join(args)}")
    done = subprocess.run(
        [sys.executable, "-m", "orch_outbox.cli", *args], cwd=HERE, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"orch-outbox {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    sys.stderr.write(done.stderr)
    return done.stdout


def create_database(url: str) -> None:
    """CREATE DATABASE for the shop if it does not exist yet (connected to the server's ``postgres`` database)."""
    import sqlalchemy as sa

    target = sa.make_url(url)
    admin = sa.create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            found = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database})
            if found.first() is None:
                quoted = conn.dialect.identifier_preparer.quote(str(target.database))
                conn.execute(sa.text(f"CREATE DATABASE {quoted}"))
                print(f"created database {target.database}")
    finally:
        admin.dispose()


def main() -> int:
    # SIGTERM (like Ctrl-C) ends the script through its `finally`, which stops the worker and beat.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    os.chdir(HERE)
    import shop

    create_database(shop.DATABASE_URL)
    shop.Base.metadata.create_all(shop.engine)  # the shop's own table (your migrations, in a real app)
    print("the orders table exists")
    print(cli("-A", "shop:outbox", "migrate"), end="")
    logs = Path(tempfile.mkdtemp(prefix="orch-outbox-shop-"))
    services = Services(logs)
    try:
        services.start("worker", "worker", "-Q", shop.QUEUE, "--pool", "threads", "--loglevel", "INFO")
        services.start("beat", "beat", "--loglevel", "INFO", "--schedule", str(logs / "celerybeat-schedule"))
        ok = asyncio.run(place_and_check(shop, services))
    finally:
        services.stop()
        shop.engine.dispose()
        shop.outbox.close()
    if ok:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"the logs are in {logs}")
    print("fastapi_sqlalchemy: every order confirmed" if ok else "fastapi_sqlalchemy: FAILED", flush=True)
    return 0 if ok else 1


async def place_and_check(shop: Any, services: Services) -> bool:
    """Place the orders through the API; True if the accepted ones were confirmed and the refused ones left nothing."""
    import httpx
    import sqlalchemy as sa

    from orch_outbox import FINAL_STATUSES

    outbox = shop.outbox
    item = f"book-{uuid.uuid4().hex[:6]}"  # this run's orders, told apart from earlier runs' in the same database
    commands_before = outbox.count(name="confirm_order")
    transport = httpx.ASGITransport(app=shop.api)
    async with (
        shop.api.router.lifespan_context(shop.api),
        httpx.AsyncClient(transport=transport, base_url="http://shop") as client,
    ):
        placed = []
        for path in ("/orders", "/async/orders"):
            response = await client.post(path, json={"item": item, "quantity": 2})
            print(f"POST {path} 2 x {item}: {response.status_code} {response.json()}")
            if response.status_code != 201:
                return False
            placed.append(response.json())
        for path in ("/orders", "/async/orders"):
            refused = await client.post(path, json={"item": f"{item}-too-many", "quantity": shop.STOCK + 1})
            print(f"POST {path} {shop.STOCK + 1} x {item}-too-many: {refused.status_code} {refused.json()}")
            if refused.status_code != 409:
                return False

        deadline = time.monotonic() + WAIT
        while not all(outbox.get(p["command_id"]).status in FINAL_STATUSES for p in placed):
            if time.monotonic() > deadline:
                print(f"timed out after {WAIT}s: {[outbox.get(p['command_id']).status for p in placed]}")
                return False
            services.check()
            await asyncio.sleep(0.2)

        ok = True
        for p in placed:
            info = outbox.get(p["command_id"])
            order = (await client.get(f"/orders/{p['order_id']}")).json()
            print(f"{info.name}({p['order_id']}) {info.status}: {info.output!r}; the order is {order['status']}")
            ok &= info.status == "completed" and order["status"] == "confirmed"
    with shop.Sessions() as session:
        refused_orders = session.scalar(
            sa.select(sa.func.count()).select_from(shop.Order).where(shop.Order.item == f"{item}-too-many")
        )
    commands = outbox.count(name="confirm_order") - commands_before
    print(f"refused orders stored: {refused_orders}; commands pushed by this run: {commands} (2 accepted orders)")
    return bool(ok) and refused_orders == 0 and commands == 2


if __name__ == "__main__":
    sys.exit(main())
