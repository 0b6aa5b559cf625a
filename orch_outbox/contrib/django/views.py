"""The outbox's admin page: counts by target and status, for staff only, from the outbox's own overview.

It reads what ``orch-outbox web``'s overview reads (``outbox.reads.store.overview()``: unfinished
commands by target and status, final ones of the last hour; on ``outbox_read_database_url``
when set) and links to that operator's page when ``CELERY_OUTBOX_WEB_URL`` names it.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from .outbox import find_outbox

#: The columns of the unfinished counts, in the lifecycle's order.
COLUMNS = ("pending_due", "pending_later", "dispatched", "running")


def counts_by_target(unfinished: list[tuple[str, str, int, int]]) -> list[dict[str, Any]]:
    """The overview's (target, status, count, due) rows as one row per target, with its total."""
    targets: dict[str, dict[str, Any]] = {}
    for target, status, count, due in unfinished:
        row = targets.setdefault(target, {"target": target, **dict.fromkeys(COLUMNS, 0)})
        if status == "pending":
            row["pending_due"], row["pending_later"] = due, count - due
        else:
            row[status] = count
    for row in targets.values():
        row["total"] = sum(row[c] for c in COLUMNS)
    return [targets[t] for t in sorted(targets)]


@staff_member_required
def overview(request: HttpRequest, outbox: str | None = None) -> HttpResponse:
    """The outbox's counts (``outbox``: a ``module:attribute``, by default the project's DjangoOutbox)."""
    box = find_outbox(outbox)
    counts = box.reads.store.overview()
    web_url = str(box.app.conf.get("outbox_web_url") or "").rstrip("/")
    context = {
        **admin.site.each_context(request),
        "title": "Outbox",
        "targets": counts_by_target(counts["unfinished"]),
        "last_hour": sorted(counts["last_hour"].items()),
        "paused": box.reads.paused(),
        "web_url": web_url,
        "database": box.reads.engine.url.render_as_string(hide_password=True),
        "prefix": box.settings.table_prefix,
    }
    return render(request, "orch_outbox/overview.html", context)
