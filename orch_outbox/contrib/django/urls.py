"""The outbox's admin page: ``path("admin/outbox/", include("orch_outbox.contrib.django.urls"))``, before the admin's
own ``path("admin/", admin.site.urls)`` (whose catch-all would answer first)."""

from __future__ import annotations

from django.urls import path

from .views import overview

app_name = "orch_outbox"
urlpatterns = [path("", overview, name="overview")]
