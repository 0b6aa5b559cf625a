"""The example's Django project. As Celery's Django guide says: the Celery app is loaded when Django starts."""

from .celery import app as celery_app
from .celery import outbox

__all__ = ("celery_app", "outbox")
