"""The Django shop end to end, on PostgreSQL and RabbitMQ: orders placed in ``atomic()``, confirmed by a worker.

It creates the database if it does not exist, runs ``manage.py migrate`` (Django's tables and
the shop's) and ``manage.py outbox_migrate`` (the outbox's), starts ``celery -A proj worker -Q
<queue>`` and ``celery -A proj beat`` in this folder, then places two orders with ``manage.py
place_order``: one of 2 items, and one over the stock, refused after its push (the
transaction rolls back). It waits (bounded) until the accepted order's command is final and
exits 0 only if it completed with its output (read back with ``outbox.get``), the order is
confirmed, and the refused order left neither an order nor a command.

Environment: ``SHOP_DB_NAME`` (and the other ``SHOP_DB_*``), ``BROKER_URL``, ``ORDERS_QUEUE``
(see proj/settings.py).
"""

from __future__ import annotations

import contextlib
import json
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
#: The longest wait for the command to be final, in seconds.
WAIT = 60.0
#: The longest wait for a stopped process to exit before it is killed.
STOP_GRACE = 10.0


class Services:
    """``celery -A proj`` subprocesses run in this folder, each in a process group of its own, output in a log."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str, *args: str) -> None:
        print(f"$ celery -A proj {' '.join(args)} &   (log: {self.logs / role}.log)")
        with (self.logs / f"{role}.log").open("wb") as log:
            self.procs[role] = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "proj", *args],
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


def manage(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python manage.py ARGS`` in this folder, as a user would run it; its output is printed."""
    print(f"$ python manage.py {' '.join(args)}")
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=HERE, capture_output=True, text=True, timeout=120, check=False
    )
    print(done.stdout + done.stderr, end="")
    if check and done.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed ({done.returncode})")
    return done


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
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    from orch_outbox.contrib.django import database_url

    create_database(database_url())
    import django

    django.setup()
    from proj.celery import outbox
    from shop.models import Order
    from shop.tasks import QUEUE

    manage("migrate", "--verbosity", "0")
    manage("outbox_migrate")
    logs = Path(tempfile.mkdtemp(prefix="orch-outbox-django-"))
    services = Services(logs)
    quiet = ("--without-mingle", "--without-gossip")
    try:
        services.start("worker", "worker", "-Q", QUEUE, "--pool", "threads", *quiet, "--loglevel", "INFO")
        services.start("beat", "beat", "--loglevel", "INFO", "--schedule", str(logs / "celerybeat-schedule"))
        ok = place_and_check(outbox, Order, services)
    finally:
        services.stop()
        outbox.close()
    if ok:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"the logs are in {logs}")
    print("django: the order was confirmed" if ok else "django: FAILED", flush=True)
    return 0 if ok else 1


def place_and_check(outbox: Any, order_model: Any, services: Services) -> bool:
    """Place the orders; True if the accepted one was confirmed and the refused one left nothing."""
    from orch_outbox import FINAL_STATUSES

    item = f"book-{uuid.uuid4().hex[:6]}"  # this run's orders, told apart from earlier runs' in the same database
    commands_before = outbox.count(name="confirm_order")
    placed = json.loads(manage("place_order", item, "2").stdout.strip().splitlines()[-1])
    refused = manage("place_order", f"{item}-too-many", "101", check=False)
    if refused.returncode == 0:
        print("the order over the stock was not refused")
        return False
    deadline = time.monotonic() + WAIT
    while (info := outbox.get(placed["command_id"])).status not in FINAL_STATUSES:
        if time.monotonic() > deadline:
            print(f"timed out after {WAIT}s: the command is {info.status}")
            return False
        services.check()
        time.sleep(0.2)
    order = order_model.objects.get(pk=placed["order_id"])
    print(f"{info.name}({placed['order_id']}) {info.status}: {info.output!r}; the order is {order.status}")
    refused_orders = order_model.objects.filter(item=f"{item}-too-many").count()
    commands = outbox.count(name="confirm_order") - commands_before
    print(f"refused orders stored: {refused_orders}; commands pushed by this run: {commands} (1 accepted order)")
    expected = f"order {placed['order_id']}: 2 x {item} confirmed"
    return (
        info.status == "completed"
        and info.output == expected
        and order.status == "confirmed"
        and (refused_orders == 0 and commands == 1)
    )


if __name__ == "__main__":
    sys.exit(main())
