"""The shop's Celery configuration, from the environment (``app.config_from_object("shopconfig")``).

``DATABASE_URL``: the PostgreSQL database of the orders *and* of the outbox (one transaction
writes both). ``BROKER_URL``: RabbitMQ (or Redis). ``ORDERS_QUEUE`` (read in shop.py): the
queue of the commands.
"""

import os

broker_url = os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
broker_connection_retry_on_startup = True
outbox_database_url = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/shop")
beat_scheduler = "orch_outbox.beat:Scheduler"  # beat runs the relay (LISTEN/NOTIFY) and the rescuer
task_serializer = result_serializer = "json"
accept_content = ["json"]
