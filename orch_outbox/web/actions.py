"""The actions (only with ``--allow-actions``): cancel, requeue, purge, run now; pause and resume; schedules.

A bulk action is two steps. The first POST names rows (the ticked ones, or every row
matching the filter) and answers a confirmation page that says how many rows it will
touch and lists them; the second POST, from that page, acts on exactly those ids. Every
POST carries the CSRF token; every action is logged with who did it.
"""

from __future__ import annotations

import uuid

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from ..errors import ScheduleNotFound
from ..models import CommandInfo
from .security import audit
from .views import filters_of, outbox, search_from

actions = Blueprint("actions", __name__)

#: Most rows one bulk action may touch (the confirmation lists them all as hidden fields).
MAX_ROWS = 10_000
ACTIONS = {
    "cancel": "Cancel",
    "requeue": "Requeue",
    "purge": "Delete",
    "run_now": "Run now",
}


@actions.before_request
def allowed() -> None:
    if not current_app.config.get("ALLOW_ACTIONS"):
        abort(403, "this page is read-only: start it with --allow-actions")


@actions.route("/actions", methods=["POST"])
def act() -> str | Response:
    action = request.form.get("action", "")
    if action not in ACTIONS:
        abort(400, f"unknown action {action!r}")
    if request.form.get("confirm") == "1":
        ids = [uuid.UUID(i) for i in request.form.getlist("ids")]
        done = _perform(action, ids)
        audit(action, done, f"of {len(ids)} confirmed")
        return render_template("done.html", action=ACTIONS[action], done=done, asked=len(ids))
    if request.form.get("all") == "1":
        ids = outbox().store.matching_ids(search_from(request.form), MAX_ROWS + 1)
    else:
        ids = [uuid.UUID(i) for i in request.form.getlist("ids")]
    if len(ids) > MAX_ROWS:
        abort(400, f"more than {MAX_ROWS} rows match: narrow the filter")
    found = {c.id: c for c in _infos(ids[:20])}
    return render_template(
        "confirm.html",
        action=action,
        label=ACTIONS[action],
        ids=ids,
        shown=[found[i] for i in ids[:20] if i in found],
        filters=filters_of(request.form),
    )


def _perform(action: str, ids: list[uuid.UUID]) -> int:
    return outbox().bulk(action, ids)


def _infos(ids: list[uuid.UUID]) -> list[CommandInfo]:
    if not ids:
        return []
    return [CommandInfo.from_row(r) for r in outbox().store.find(len(ids), 0, ids=ids)]


@actions.route("/pause", methods=["POST"])
def pause() -> Response:
    scope, value = request.form.get("scope", ""), request.form.get("value", "")
    box = outbox()
    kwargs = {scope: value} if scope in ("target", "tenant") and value else {}
    resume = request.form.get("resume") == "1"
    changed = box.resume(**kwargs) if resume else box.pause(**kwargs)
    audit("resume" if resume else "pause", int(changed), kwargs or "everything")
    return redirect(url_for("pages.overview"))


@actions.route("/schedules/<name>/<op>", methods=["POST"])
def schedule(name: str, op: str) -> Response:
    box = outbox()
    try:
        if op in ("enable", "disable"):
            box.enable_schedule(name, op == "enable")
        elif op == "trigger":
            box.store.set_schedule(name, next_run_at=box.store.now())
            box.tick_schedules()
        else:
            abort(400, f"unknown schedule action {op!r}")
    except ScheduleNotFound:
        abort(404)
    audit(f"schedule {op}", 1, name)
    return redirect(url_for("pages.schedules"))
