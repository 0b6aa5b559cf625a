"""``orch-outbox``: migrate the database, run the demo, read and cancel commands, and operate the outbox:
batches, tenants, pauses, the dead letters, cron schedules, the worker registry and jobs.

Every command works on the ready app (configured from ``celeryconfig`` and
``ORCH_OUTBOX_*``) unless ``-A module:attr`` names a Celery app or an Outbox.
Listing commands print a table for people, or JSON with ``--json``, and page with
``--limit`` and ``--offset``.
"""

from __future__ import annotations

from . import core, operate, schedules, workers
from .base import main

__all__ = ["core", "main", "operate", "schedules", "workers"]
