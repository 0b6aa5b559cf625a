"""The Django app of the integration: its management command and its admin page's template."""

from __future__ import annotations

from django.apps import AppConfig


class OutboxConfig(AppConfig):
    """``INSTALLED_APPS = [..., "orch_outbox.contrib.django"]``: no models; ``manage.py outbox_migrate``."""

    name = "orch_outbox.contrib.django"
    label = "orch_outbox"
    verbose_name = "Outbox"
