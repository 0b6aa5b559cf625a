"""``manage.py outbox_migrate``: create or upgrade the outbox tables in the outbox's database (Django's, by default)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from orch_outbox import migrate as migrations
from orch_outbox.contrib.django.outbox import find_outbox


class Command(BaseCommand):
    help = (
        "Create or upgrade the outbox tables (the outbox's Alembic migrations) in the outbox's database: "
        "CELERY_OUTBOX_DATABASE_URL, else Django's DATABASES['default']."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--revision", default="head", help="the revision to upgrade to (default: head)")
        parser.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
        parser.add_argument(
            "--outbox",
            default=None,
            help="module:attribute of the outbox (default: the DjangoOutbox made in proj/celery.py)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        outbox = find_outbox(options["outbox"])
        url = outbox.engine.url
        prefix = outbox.settings.table_prefix
        revision = options["revision"]
        if options["sql"]:
            self.stdout.write(migrations.upgrade_sql(url.render_as_string(hide_password=False), prefix, revision))
            return
        with outbox.engine.begin() as conn:
            migrations.upgrade(prefix=prefix, revision=revision, connection=conn)
        shown = url.render_as_string(hide_password=True)
        self.stdout.write(f"outbox tables with prefix {prefix!r} are at revision {revision} ({shown})")
