"""Example configuration of the ready app (``celery -A orch_outbox worker``).

The ready app reads a ``celeryconfig`` module from the current directory. As shipped,
everything below is commented out and the embedded default applies: a SQLite file and
kombu's filesystem broker under ``./.orch_outbox``, no server needed. Uncomment for
production; every ``outbox_*`` key can also be set as ``ORCH_OUTBOX_<KEY>``.
"""

# Your command modules, imported by workers and beat (Celery's own `imports` setting).
imports: tuple[str, ...] = ()

# --- production -----------------------------------------------------------------------
# broker_url = "amqp://guest:guest@127.0.0.1:5672//"      # or "redis://127.0.0.1:6379/0"
# broker_transport_options = {"confirm_publish": True}     # RabbitMQ publisher confirms
# outbox_database_url = "postgresql+psycopg://app@127.0.0.1:5432/app"
# outbox_table_prefix = "orch_"
# outbox_default_timeout = 60
# outbox_default_retries = 3
# outbox_poll_interval = 1.0
# worker_send_task_events = True                           # for Flower
