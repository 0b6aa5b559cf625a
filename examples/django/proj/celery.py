"""The project's Celery app, configured from Django's settings (``CELERY_*``), with its outbox.

``celery -A proj worker -Q orders`` runs the commands, ``celery -A proj beat`` the relay and the
rescuer. The outbox lives in Django's database (``DATABASES["default"]``, no
``CELERY_OUTBOX_DATABASE_URL`` here) and ``cmd.push(...)`` writes on Django's connection.
"""

import os

from celery import Celery

from orch_outbox.contrib.django import DjangoOutbox

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
outbox = DjangoOutbox(app)
app.autodiscover_tasks()  # shop/tasks.py: the commands
