"""The read-only pages: overview, commands (search), one command, batches, schedules, workers."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING, Any

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from ..errors import BatchNotFound, CommandNotFound, InvalidOption
from ..models import CommandInfo
from ..schema import STATUSES
from ..store import SORTS, Search

if TYPE_CHECKING:
    from ..outbox import Outbox

pages = Blueprint("pages", __name__)

PAGE = 50
#: A command's tree stops there (a very long chain shows its first steps).
TREE_NODES = 200


def outbox() -> Outbox:
    return current_app.config["OUTBOX"]  # type: ignore[no-any-return]


def reader() -> Outbox:
    """The outbox the pages read from: on ``outbox_read_database_url`` (a standby) when set."""
    return outbox().reads


def search_from(args: Any) -> Search:
    """The filters of a search from a query string (or a form): unknown or blank values are no filter."""
    status = args.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidOption(f"unknown status {status!r}")
    batch = args.get("batch") or None
    return Search(
        status=status,
        name=args.get("name") or None,
        target=args.get("target") or None,
        tenant=args.get("tenant") or None,
        batch_id=uuid.UUID(batch) if batch else None,
        created_after=_when(args.get("after")),
        created_before=_when(args.get("before")),
        error=args.get("error") or None,
    )


def _when(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def filters_of(args: Any) -> dict[str, str]:
    """The non-blank filter fields of a query string, to carry into links and forms."""
    keys = ("status", "name", "target", "tenant", "batch", "after", "before", "error", "sort")
    return {k: args.get(k) for k in keys if args.get(k)}


@pages.errorhandler(InvalidOption)
@pages.errorhandler(ValueError)
def bad_filter(exc: Exception) -> tuple[str, int]:
    return render_template("error.html", message=str(exc)), 400


@pages.route("/")
def overview() -> str:
    box = reader()
    counts = box.store.overview()
    targets: dict[str, dict[str, Any]] = {}
    for target, status, n, due in counts["unfinished"]:
        row = targets.setdefault(target, {"pending_due": 0, "pending_later": 0, "dispatched": 0, "running": 0})
        if status == "pending":
            row["pending_due"], row["pending_later"] = due, n - due
        else:
            row[status] = n
    workers = box.workers(limit=100)
    return render_template(
        "overview.html",
        targets=sorted(targets.items()),
        last_hour=counts["last_hour"],
        paused=box.paused(),
        workers=workers,
    )


@pages.route("/commands")
def commands() -> str:
    box = reader()
    search = search_from(request.args)
    sort = request.args.get("sort") or "created"
    if sort not in SORTS:
        raise InvalidOption(f"sort must be one of {SORTS}")
    offset = max(int(request.args.get("offset") or 0), 0)
    rows, total = box.store.search(search, PAGE, offset, sort)
    found = [CommandInfo.from_row(r) for r in rows]
    return render_template(
        "commands.html",
        found=found,
        total=total,
        offset=offset,
        page=PAGE,
        filters=filters_of(request.args),
        statuses=STATUSES,
        sorts=SORTS,
    )


@pages.route("/dead")
def dead() -> Response:
    return redirect(url_for("pages.commands", status="failed", sort="created"))


@pages.route("/commands/<command_id>")
def command(command_id: str) -> str:
    box = reader()
    try:
        info = box.get(command_id)
    except (CommandNotFound, ValueError):
        abort(404)
    task = box.app.tasks.get(info.name)
    hidden = bool(getattr(task, "outbox_hide_input", False))
    parent = box.get(info.parent_id) if info.parent_id else None
    return render_template(
        "command.html",
        info=info,
        hidden=hidden,
        attempts=box.attempts(info.id),
        parent=parent,
        tree=_tree(box, info),
        flower=current_app.config.get("FLOWER_URL"),
    )


def _tree(box: Outbox, root: CommandInfo) -> list[tuple[int, CommandInfo]]:
    """The commands chained from ``root``, depth first, with their depth (bounded to TREE_NODES)."""
    out: list[tuple[int, CommandInfo]] = []
    stack = [(1, c) for c in reversed(box.children(root.id))]
    while stack and len(out) < TREE_NODES:
        depth, node = stack.pop()
        out.append((depth, node))
        stack.extend((depth + 1, c) for c in reversed(box.children(node.id)))
    return out


@pages.route("/batches")
def batches() -> str:
    offset = max(int(request.args.get("offset") or 0), 0)
    tenant = request.args.get("tenant") or None
    found = reader().batches(tenant=tenant, limit=PAGE, offset=offset)
    return render_template("batches.html", found=found, offset=offset, page=PAGE, tenant=tenant)


@pages.route("/batches/<batch_id>")
def batch(batch_id: str) -> Response:
    try:
        reader().batch(batch_id)
    except (BatchNotFound, ValueError):
        abort(404)
    return redirect(url_for("pages.commands", batch=batch_id))


@pages.route("/schedules")
def schedules() -> str:
    return render_template("schedules.html", found=reader().schedules())


@pages.route("/workers")
def workers() -> str:
    return render_template("workers.html", found=reader().workers(limit=200))
