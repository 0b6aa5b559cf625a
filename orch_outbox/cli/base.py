"""The ``orch-outbox`` group, its shared options and how results are shown."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from kombu.utils.imports import symbol_by_name
from kombu.utils.url import maybe_sanitize_url

from ..errors import OutboxError
from ..jsoncodec import encode
from ..outbox import BatchInfo, CommandInfo, Outbox, ScheduleInfo, outbox_of
from ..render import table
from ..store import ErrorInfo

F = TypeVar("F", bound=Callable[..., Any])
#: Widest error message shown in a table (``--json`` has them whole).
ERROR_WIDTH = 60


def _resolve(app_path: str | None) -> Outbox:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not app_path:
        from ..default import default_outbox

        return default_outbox()
    target = symbol_by_name(app_path)  # type: ignore[no-untyped-call]
    if isinstance(target, Outbox):
        return target
    return outbox_of(target)


class OutboxGroup(click.Group):
    """A command group that reports an :class:`OutboxError` as a one-line error and exit code 1, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OutboxError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=OutboxGroup)
@click.option(
    "-A",
    "--app",
    "app_path",
    envvar="ORCH_OUTBOX_APP",
    default=None,
    help="module:attr of a Celery app or Outbox (default: the ready app from celeryconfig).",
)
@click.pass_context
def main(ctx: click.Context, app_path: str | None) -> None:
    """orch-outbox: a transactional outbox for Celery."""
    ctx.obj = app_path


def _outbox(ctx: click.Context) -> Outbox:
    try:
        return _resolve(ctx.obj)
    except (OutboxError, ImportError, AttributeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _reader(ctx: click.Context) -> Outbox:
    """The outbox for a read-only command: on ``outbox_read_database_url`` (a standby) when set."""
    return _outbox(ctx).reads


# -- which outbox: said on stderr by migrate and status -------------------------------------

#: ``name = Outbox(`` (or ``name: Outbox = orch_outbox.Outbox(``) at the start of a line: an outbox a module builds.
_BUILDS_OUTBOX = re.compile(r"^(\w+)\s*(?::[^=\n]*)?=\s*(?:\w+\.)*Outbox\(", re.M)
#: Files larger than this are not read by the scan (it must stay cheap).
_SCAN_LIMIT = 256 * 1024


def outboxes_here(folder: str) -> list[str]:
    """``module:attr`` of each outbox the ``*.py`` files of ``folder`` build (``Outbox(`` in their text).

    A cheap text scan, nothing imported: the attribute is the name the outbox is assigned to
    (``outbox`` when the file builds one some other way)."""
    found = []
    for path in sorted(Path(folder).glob("*.py")):
        if not path.stem.isidentifier() or path.stem == "celeryconfig":
            continue
        try:
            if not path.is_file() or path.stat().st_size > _SCAN_LIMIT:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if "Outbox(" not in text:
            continue
        assigned = _BUILDS_OUTBOX.search(text)
        found.append(f"{path.stem}:{assigned.group(1) if assigned else 'outbox'}")
    return found


def which_outbox(ctx: click.Context, outbox: Outbox) -> str:
    """One line saying which outbox and database a command used (password hidden), with a hint when no ``-A``
    was given but a module of the current directory builds its own outbox."""
    url = outbox.engine.url.render_as_string(hide_password=True)
    if ctx.obj:
        return f"using the outbox {ctx.obj} ({url})"
    config = sys.modules.get(os.environ.get("ORCH_OUTBOX_CONFIG_MODULE") or "celeryconfig")
    origin = getattr(config, "__file__", None)
    line = f"using the default outbox ({url}{f', configured by {os.path.relpath(origin)}' if origin else ''})"
    others = outboxes_here(os.getcwd())
    if others:
        module = others[0].partition(":")[0]
        line += f"; for the outbox in {module}.py pass -A {others[0]}"
    return line


def say_which_outbox(ctx: click.Context, outbox: Outbox) -> None:
    """Print :func:`which_outbox` on stderr (stdout stays the command's own output, ``--json`` included)."""
    click.echo(which_outbox(ctx, outbox), err=True)


# -- shared options -----------------------------------------------------------------------


def _masked(value: Any) -> Any:
    """A URL's password hidden, as ``celery report`` shows URLs; other values as they are."""
    return maybe_sanitize_url(value) if isinstance(value, str) and "://" in value else value


def json_option(func: F) -> F:
    """``--json``: print JSON for scripts instead of text for people."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def paging_options(func: F) -> F:
    """``--limit`` and ``--offset`` of a listing."""
    offset = click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Rows to skip.")
    limit = click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Most rows.")
    return limit(offset(func))


def scope_options(func: F) -> F:
    """``--target`` and ``--tenant``: whose commands (neither: everyone's)."""
    func = click.option("--tenant", default=None, help="Only this tenant's commands.")(func)
    return click.option("--target", default=None, help="Only commands of this target (queue).")(func)


def filter_options(func: F) -> F:
    """``--name``, ``--target`` and ``--tenant``: which commands."""
    return click.option("--name", default=None, help="Only commands of this name.")(scope_options(func))


def json_of(kind: type[list[Any]] | type[dict[str, Any]]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """An option callback that reads a JSON array (``kind=list``) or object (``kind=dict``)."""
    shape = "array" if kind is list else "object"

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return kind()
        try:
            data = json.loads(value)
        except ValueError as exc:
            raise click.BadParameter(f"{value!r} is not valid JSON ({exc})", ctx, param) from None
        if not isinstance(data, kind):
            raise click.BadParameter(f"{value!r} is not a JSON {shape}", ctx, param)
        return data

    return parse


# -- output -------------------------------------------------------------------------------


def emit(as_json: bool, data: Any, text: str) -> None:
    """Print ``data`` as JSON (``--json``, for scripts) or ``text`` (for people)."""
    click.echo(json.dumps(encode(data), indent=2, sort_keys=True) if as_json else text)


def describe(info: CommandInfo) -> str:
    """A command as lines of ``key: value`` for people."""
    lines = [
        ("id", str(info.id)),
        ("name", info.name),
        ("target", info.target),
        ("status", info.status),
        ("outcome", info.outcome or "-"),
        ("attempt", str(info.attempt)),
        ("retries left", f"{info.retries_left} of {info.retries}"),
        ("input", json.dumps(info.input)),
        ("output", json.dumps(info.output) if info.status == "completed" else "-"),
        ("created", str(info.created_at)),
        ("scheduled", str(info.scheduled_at)),
        ("finished", str(info.finished_at or "-")),
        ("worker", info.worker or "-"),
        ("parent", str(info.parent_id or "-")),
    ]
    if info.error:
        lines.append(("error", f"{info.error.type}: {info.error.message}"))
    return fields(lines)


def describe_batch(info: BatchInfo) -> str:
    """A batch as lines of ``key: value`` for people."""
    return fields(
        [
            ("id", info.id),
            ("tenant", info.tenant or "-"),
            ("kind", info.kind),
            ("status", info.status),
            ("members", counted(info.counts)),
            ("progress", f"{info.done}/{info.total} final ({percent(info.progress)})"),
            ("created", when(info.created_at)),
            ("first started", when(info.first_started_at)),
            ("last finished", when(info.last_finished_at)),
            ("finished", when(info.finished_at)),
            ("continuation", continuation_text(info)),
        ]
    )


def continuation_text(info: BatchInfo) -> str:
    """A batch's continuation: its id, and whether it will still run."""
    if info.continuation_id is None:
        return "-"
    if info.status == "canceled":
        return f"{info.continuation_id} (never runs: the batch was canceled)"
    return str(info.continuation_id)


def describe_schedule(info: ScheduleInfo) -> str:
    """A schedule as lines of ``key: value`` for people."""
    return fields(
        [
            ("name", info.name),
            ("command", info.command),
            ("input", json.dumps(info.input)),
            ("cron", f"{info.cron} ({info.timezone})"),
            ("target", info.target),
            ("tenant", info.tenant or "-"),
            ("enabled", "yes" if info.enabled else "no"),
            ("unique", "yes (a tick is skipped while the previous command runs)" if info.unique else "no"),
            ("next run", when(info.next_run_at) if info.enabled else "- (disabled)"),
            ("last run", when(info.last_run_at)),
            ("last command", info.last_command_id or "-"),
            ("skipped ticks", info.skipped),
        ]
    )


def commands_table(found: list[CommandInfo], empty: str) -> str:
    """Commands as a table, each error's type and first line of message clipped to :data:`ERROR_WIDTH`."""
    rows = [
        (c.id, c.name, c.target, c.tenant or "-", c.status, c.attempt, when(c.finished_at), error_text(c))
        for c in found
    ]
    return table(("id", "name", "target", "tenant", "status", "attempt", "finished", "error"), rows, empty=empty)


def error_text(info: CommandInfo) -> str:
    """A command's error on one line, clipped for a table."""
    return error_line(info.error)


def error_line(error: ErrorInfo | None) -> str:
    """An error on one line, clipped to :data:`ERROR_WIDTH`."""
    if error is None:
        return "-"
    text = " ".join(f"{error.type}: {error.message}".split())
    return text if len(text) <= ERROR_WIDTH else text[: ERROR_WIDTH - 3] + "..."


def fields(lines: Sequence[tuple[str, Any]]) -> str:
    """Lines of ``key  value``, the values aligned."""
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def counted(counts: dict[str, int]) -> str:
    """``{"pending": 2, "failed": 1}`` as ``failed 1, pending 2 (3 in all)``."""
    if not counts:
        return "none"
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) + f" ({sum(counts.values())} in all)"


def percent(share: float) -> str:
    """0.5 as ``50.0%``."""
    return f"{share * 100:.1f}%"


def when(value: dt.datetime | None) -> str:
    """A timestamp to the second, or ``-``."""
    return "-" if value is None else value.isoformat(" ", "seconds")


def scope_of(target: str | None, tenant: str | None) -> tuple[str, str]:
    """The scope of a pause from --target and --tenant: ``("target", "mail")``, ``("all", "")``..."""
    if target is not None:
        return "target", target
    if tenant is not None:
        return "tenant", tenant
    return "all", ""


def scope_text(scope: str, value: str) -> str:
    """What a pause covers, in words."""
    return "everything" if scope == "all" else f"{scope} {value!r}"


def ready_outbox(ctx: click.Context) -> tuple[Outbox, threading.Event]:
    """The outbox of a long-running command, its database checked, and an event set by SIGINT or SIGTERM."""
    outbox = _outbox(ctx)
    problem = outbox.database_problem()
    if problem:
        raise click.ClickException(problem)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return outbox, stop
