"""Run as a script: the example Django project on one driver pushes in a rolled-back ``atomic()``, a committed one
and in autocommit, and prints what it saw as JSON (its last line).

``python django_driver_check.py psycopg|psycopg2``, with the project's environment (``SHOP_DB_NAME``...) set.
Django's PostgreSQL backend takes psycopg 3 whenever it can import it, and orch-outbox depends on it; for
``psycopg2`` this script hides psycopg while Django's backend is imported, so that backend runs on psycopg2 as
it does in a project without psycopg 3 (the outbox's own engine, used for reading back, stays on psycopg 3).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DRIVER = sys.argv[1]
if DRIVER == "psycopg2":
    sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django's backend falls back to psycopg2
    import django.db.backends.postgresql.base  # noqa: F401  # the backend chooses its driver on import

    del sys.modules["psycopg"]

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "django"))


class Rollback(Exception):
    pass


def main() -> None:
    import django

    django.setup()
    from django.db import connection, transaction
    from proj.celery import outbox
    from shop.models import Order
    from shop.tasks import confirm_order

    from orch_outbox import CommandNotFound

    def rows_here(command_id: object) -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM orch_commands WHERE id = %s", [str(command_id)])
            return int(cursor.fetchone()[0])

    def rows_elsewhere(command_id: object) -> int:
        """1 if the outbox's own engine (another connection) sees the command, else 0."""
        try:
            outbox.get(command_id)
        except CommandNotFound:
            return 0
        return 1

    connection.ensure_connection()
    raw = connection.connection
    seen: dict[str, object] = {
        "driver": type(raw).__module__.split(".")[0],
        "handlers_before": len(getattr(raw, "_notice_handlers", ())),
    }
    try:
        with transaction.atomic():
            order = Order.objects.create(item="rolled back", quantity=1)
            rolled_back = confirm_order.push(order.pk)
            seen["rolled_back_seen_inside"] = rows_here(rolled_back)
            seen["rolled_back_seen_elsewhere"] = rows_elsewhere(rolled_back)
            raise Rollback
    except Rollback:
        pass
    seen["rolled_back"] = str(rolled_back)
    seen["rolled_back_after"] = rows_here(rolled_back)
    with transaction.atomic():
        order = Order.objects.create(item="committed", quantity=2)
        committed = confirm_order.push(order.pk)
        seen["committed_seen_elsewhere_before_commit"] = rows_elsewhere(committed)
    seen["committed"], seen["committed_order"] = str(committed), order.pk
    with transaction.atomic():  # the holder of a unique key is read back on Django's connection (jsonb as text)
        once = confirm_order.options(unique_key=f"order-{order.pk}", delay=3600).push(order.pk)
        seen["unique_key_kept"] = confirm_order.options(unique_key=f"order-{order.pk}").push(order.pk) == once
    outbox.cancel(once)
    seen["committed_seen_elsewhere"] = rows_elsewhere(committed)
    order = Order.objects.create(item="autocommit", quantity=3)
    autocommit = confirm_order.push(order.pk)  # outside atomic(): Django's autocommit
    seen["autocommit_seen_elsewhere"] = rows_elsewhere(autocommit)
    seen["autocommit"], seen["autocommit_order"] = str(autocommit), order.pk
    seen["same_connection"] = connection.connection is raw and not raw.closed
    seen["django_autocommit"] = connection.get_autocommit() and not connection.in_atomic_block
    seen["handlers_after"] = len(getattr(raw, "_notice_handlers", ()))
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
