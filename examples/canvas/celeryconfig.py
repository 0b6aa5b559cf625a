"""The ready app's configuration: the commands module.

No broker and no database named here: the embedded default applies (SQLite and a
filesystem broker under ``ORCH_OUTBOX_HOME``), unless ``ORCH_OUTBOX_DATABASE_URL`` and
``CELERY_BROKER_URL`` name PostgreSQL and RabbitMQ (or Redis).
"""

imports = ("workflows",)
