"""The Django integration: add ``"orch_outbox.contrib.django"`` to ``INSTALLED_APPS``.

- :class:`DjangoOutbox` (in ``proj/celery.py``): the outbox of the project's Celery app, on
  Django's database; ``cmd.push(...)`` writes on Django's connection, inside ``atomic()``;
- ``manage.py outbox_migrate``: the outbox's tables (its Alembic migrations);
- ``orch_outbox.contrib.django.urls``: a staff-only page of the outbox's counts, for the admin.

See docs/django.md.
"""

from __future__ import annotations

from .connection import Unowned, django_connection
from .outbox import DjangoOutbox, database_url, find_outbox, url_of

__all__ = ["DjangoOutbox", "Unowned", "database_url", "django_connection", "find_outbox", "url_of"]
