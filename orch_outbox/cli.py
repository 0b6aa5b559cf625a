"""``orch-outbox``: migrate the database, run the demo, read and cancel commands, and operate the outbox:
batches, tenants, pauses, the dead letters and cron schedules.

Every command works on the ready app (configured from ``celeryconfig`` and
``ORCH_OUTBOX_*``) unless ``-A module:attr`` names a Celery app or an Outbox.
Listing commands print a table for people, or JSON with ``--json``, and page with
``--limit`` and ``--offset``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from kombu.utils.imports import symbol_by_name
from kombu.utils.url import maybe_sanitize_url

from . import demo as demo_mod
from .errors import OutboxError
from .jsoncodec import encode
from .outbox import BatchInfo, CommandInfo, Outbox, ScheduleInfo, outbox_of
from .render import table
from .schema import BATCH_STATUSES, FINAL_STATUSES

F = TypeVar("F", bound=Callable[..., Any])
#: Widest error message shown in a table (``--json`` has them whole).
ERROR_WIDTH = 60


def _resolve(app_path: str | None) -> Outbox:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not app_path:
        from .default import default_outbox

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


# -- migrate, status, show, cancel, relay, settings, demo --------------------------------


@main.command()
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it.")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def migrate(ctx: click.Context, sql: bool, revision: str) -> None:
    """Create or upgrade the outbox tables."""
    from . import migrate as migrations

    outbox = _outbox(ctx)
    url = outbox.engine.url.render_as_string(hide_password=False)
    prefix = outbox.settings.table_prefix
    if sql:
        click.echo(migrations.upgrade_sql(url, prefix, revision))
        return
    with outbox.engine.begin() as conn:
        migrations.upgrade(prefix=prefix, revision=revision, connection=conn)
    click.echo(f"outbox tables with prefix {prefix!r} are at revision {revision} ({outbox.engine.url!r})")


@main.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Counts of commands by target and status."""
    counts = _outbox(ctx).store.counts()
    data: dict[str, dict[str, int]] = {}
    for target, state, count in counts:
        data.setdefault(target, {})[state] = count
    emit(as_json, data, table(("target", "status", "count"), counts, empty="the outbox is empty"))


@main.command()
@click.argument("command_id")
@json_option
@click.pass_context
def show(ctx: click.Context, command_id: str, as_json: bool) -> None:
    """One command: state, attempts, output or error, and the commands chained from it."""
    outbox = _outbox(ctx)
    info = outbox.get(command_id)
    children = outbox.children(info.id)
    text = describe(info)
    if children:
        text += "\nchained:\n" + table(("id", "name", "status"), [(c.id, c.name, c.status) for c in children])
    emit(as_json, {**info.to_json(), "children": [c.to_json() for c in children]}, text)


@main.command()
@click.argument("command_id")
@click.pass_context
def cancel(ctx: click.Context, command_id: str) -> None:
    """Cancel a command: at once if pending or dispatched; a running one is interrupted by its worker."""
    outbox = _outbox(ctx)
    done = outbox.cancel(command_id)
    status = outbox.get(command_id).status
    if not done:
        raise click.ClickException(f"{command_id} is already {status}; nothing canceled")
    if status == "running":
        click.echo(f"cancellation of running command {command_id} requested; its worker records it")
    else:
        click.echo(f"canceled {command_id}")


@main.command()
@click.pass_context
def relay(ctx: click.Context) -> None:
    """Run the relay and the lease rescuer in the foreground (instead of, or beside, beat)."""
    import signal
    import threading

    from .relay import ListeningRelay

    outbox = _outbox(ctx)
    problem = outbox.database_problem()
    if problem:
        raise click.ClickException(problem)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if outbox.store.can_listen:
        click.echo(
            f"relaying on NOTIFY {outbox.settings.table_prefix}commands, polling every "
            f"{outbox.settings.poll_interval}s as the fallback"
        )
        ListeningRelay(outbox, stop).run()
        return
    click.echo(f"relaying every {outbox.settings.poll_interval}s")
    while not stop.is_set():
        outbox.relay_once()
        outbox.rescue_once()
        stop.wait(outbox.settings.poll_interval)


@main.command()
@click.pass_context
def settings(ctx: click.Context) -> None:
    """The effective outbox settings."""
    from .settings import describe as describe_settings

    outbox = _outbox(ctx)
    rows = [
        (key, env, repr(_masked(getattr(outbox.settings, key[len("outbox_") :]))))
        for key, env, _default, _meaning in describe_settings()
    ]
    click.echo(table(("setting", "environment variable", "value"), rows))


@main.command()
@click.option("--home", default=None, help="Folder for the demo's SQLite file and broker (default: a temp folder).")
def demo(home: str | None) -> None:
    """Run the whole loop on the embedded default and print the final states."""
    sys.exit(demo_mod.run(home))


# -- batches and tenants ------------------------------------------------------------------


@main.group()
def batches() -> None:
    """Batches of commands: list, show and cancel."""


@batches.command("list")
@click.option("--tenant", default=None, help="Only this tenant's batches.")
@click.option("--status", type=click.Choice(BATCH_STATUSES), default=None, help="Only batches in this state.")
@paging_options
@json_option
@click.pass_context
def batches_list(
    ctx: click.Context, tenant: str | None, status: str | None, limit: int, offset: int, as_json: bool
) -> None:
    """Batches, newest first, with their progress."""
    found = _outbox(ctx).batches(tenant=tenant, status=status, limit=limit, offset=offset)
    rows = [
        (b.id, b.tenant or "-", b.kind, b.status, f"{b.done}/{b.total}", percent(b.progress), when(b.created_at))
        for b in found
    ]
    header = ("id", "tenant", "kind", "status", "done", "progress", "created")
    emit(as_json, [b.to_json() for b in found], table(header, rows, empty="no batches"))


@batches.command("show")
@click.argument("batch_id")
@click.option("--members", is_flag=True, help="Also list the batch's members (paged by --limit and --offset).")
@paging_options
@json_option
@click.pass_context
def batches_show(ctx: click.Context, batch_id: str, members: bool, limit: int, offset: int, as_json: bool) -> None:
    """One batch: state, counts by status, progress, timings and continuation."""
    outbox = _outbox(ctx)
    info = outbox.batch(batch_id)
    data = info.to_json()
    text = describe_batch(info)
    if members:
        found = outbox.batch_members(info.id, limit=limit, offset=offset)
        data["members"] = [m.to_json() for m in found]
        text += "\nmembers:\n" + commands_table(found, empty="no members")
    emit(as_json, data, text)


@batches.command("cancel")
@click.argument("batch_id")
@click.pass_context
def batches_cancel(ctx: click.Context, batch_id: str) -> None:
    """Cancel a batch: its pending members now, running ones told to stop; its continuation never runs."""
    outbox = _outbox(ctx)
    before = outbox.batch(batch_id)
    if before.status != "open":
        raise click.ClickException(f"batch {before.id} is already {before.status}; nothing canceled")
    count = outbox.cancel_batch(before.id)
    click.echo(f"canceled batch {before.id}: {count} member(s) canceled or asked to stop")


@main.command()
@click.argument("tenant")
@json_option
@click.pass_context
def tenant(ctx: click.Context, tenant: str, as_json: bool) -> None:
    """A tenant's commands and batches counted by state, and the mean run time of its completed commands."""
    stats = _outbox(ctx).tenant_stats(tenant)
    mean = stats["mean_run_seconds"]
    text = fields(
        [
            ("tenant", stats["tenant"]),
            ("commands", counted(stats["commands"])),
            ("batches", counted(stats["batches"])),
            ("mean run time", "-" if mean is None else f"{mean:.3f}s"),
        ]
    )
    emit(as_json, stats, text)


# -- pause and resume ---------------------------------------------------------------------


@main.command()
@scope_options
@click.pass_context
def pause(ctx: click.Context, target: str | None, tenant: str | None) -> None:
    """Hold back every command, one target's (--target) or one tenant's (--tenant) until `resume`.

    Paused commands stay pending; running ones finish.
    """
    what = scope_text(*scope_of(target, tenant))
    if _outbox(ctx).pause(target=target, tenant=tenant):
        click.echo(f"paused {what}")
    else:
        click.echo(f"{what} was already paused")


@main.command()
@scope_options
@click.pass_context
def resume(ctx: click.Context, target: str | None, tenant: str | None) -> None:
    """Lift the pause made with the same --target or --tenant (neither: the pause of everything)."""
    outbox = _outbox(ctx)
    what = scope_text(*scope_of(target, tenant))
    click.echo(f"resumed {what}" if outbox.resume(target=target, tenant=tenant) else f"{what} was not paused")
    left = outbox.paused()
    if left:
        click.echo("still paused: " + ", ".join(scope_text(p["scope"], p["value"]) for p in left))


@main.command()
@paging_options
@json_option
@click.pass_context
def paused(ctx: click.Context, limit: int, offset: int, as_json: bool) -> None:
    """The pauses in force."""
    found = _outbox(ctx).paused()[offset : offset + limit]
    rows = [(p["scope"], p["value"] or "-", when(p["paused_at"])) for p in found]
    emit(as_json, found, table(("scope", "value", "paused at"), rows, empty="nothing is paused"))


# -- dead letters and retention -----------------------------------------------------------


@main.command()
@filter_options
@paging_options
@json_option
@click.pass_context
def failed(
    ctx: click.Context,
    name: str | None,
    target: str | None,
    tenant: str | None,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """The dead letters: failed commands with their errors, newest first (messages whole with --json)."""
    found = _outbox(ctx).failed(name=name, target=target, tenant=tenant, limit=limit, offset=offset)
    emit(as_json, [c.to_json() for c in found], commands_table(found, empty="no failed commands"))


@main.command()
@click.argument("ids", nargs=-1)
@filter_options
@click.option("--all", "all_", is_flag=True, help="Every failed command (with filters: every matching one).")
@click.pass_context
def requeue(
    ctx: click.Context, ids: tuple[str, ...], name: str | None, target: str | None, tenant: str | None, all_: bool
) -> None:
    """Put failed commands back to pending, due now, with fresh retries: by IDS, by filters, or --all."""
    selection = select_commands("requeue", ids, name, target, tenant, all_)
    count = _outbox(ctx).requeue(**selection)
    click.echo(f"re-queued {count} failed command(s)" if count else "no failed command matched; nothing re-queued")


@main.command()
@click.argument("ids", nargs=-1)
@click.option(
    "--status", type=click.Choice(FINAL_STATUSES), default="failed", show_default=True, help="Which final state."
)
@filter_options
@click.option("--all", "all_", is_flag=True, help="Every command in --status (with filters: every matching one).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(
    ctx: click.Context,
    ids: tuple[str, ...],
    status: str,
    name: str | None,
    target: str | None,
    tenant: str | None,
    all_: bool,
    yes: bool,
) -> None:
    """Delete final commands (failed by default): by IDS, by filters, or --all. Asks first unless --yes."""
    selection = select_commands("purge", ids, name, target, tenant, all_)
    outbox = _outbox(ctx)
    if not yes:
        click.confirm(f"delete {selection_text(status, ids, name, target, tenant)} for good?", abort=True)
    count = outbox.purge(status=status, **selection)
    click.echo(f"deleted {count} {status} command(s)")


@main.command()
@click.pass_context
def cleanup(ctx: click.Context) -> None:
    """Delete final commands past their retention now (beat does it every outbox_cleanup_interval)."""
    count = _outbox(ctx).cleanup_once()
    click.echo(f"deleted {count} row(s) past their retention")


def select_commands(
    verb: str, ids: tuple[str, ...], name: str | None, target: str | None, tenant: str | None, all_: bool
) -> dict[str, Any]:
    """The keyword arguments of requeue/purge; refuses an empty selection, so a slip never takes every row."""
    if not (ids or name or target or tenant or all_):
        raise click.UsageError(f"{verb} needs IDS, a filter (--name, --target, --tenant) or --all; nothing was done")
    return {"ids": list(ids) or None, "name": name, "target": target, "tenant": tenant, "all": all_}


def selection_text(status: str, ids: tuple[str, ...], name: str | None, target: str | None, tenant: str | None) -> str:
    """What a selection of commands covers, in words: ``the failed commands among 2 id(s) with target 'mail'``."""
    filters = [f"{key} {value!r}" for key, value in (("name", name), ("target", target), ("tenant", tenant)) if value]
    if not ids and not filters:
        return f"every {status} command"
    among = f" among {len(ids)} id(s)" if ids else ""
    return f"the {status} commands{among}" + (f" with {', '.join(filters)}" if filters else "")


# -- schedules ----------------------------------------------------------------------------


@main.group()
def schedules() -> None:
    """Cron schedules: each tick pushes one command."""


@schedules.command("list")
@paging_options
@json_option
@click.pass_context
def schedules_list(ctx: click.Context, limit: int, offset: int, as_json: bool) -> None:
    """Every schedule, by name."""
    found = _outbox(ctx).schedules()[offset : offset + limit]
    rows = [
        (s.name, s.command, s.cron, s.timezone, s.target, "yes" if s.enabled else "no", when(s.next_run_at))
        for s in found
    ]
    header = ("name", "command", "cron", "timezone", "target", "enabled", "next run")
    emit(as_json, [s.to_json() for s in found], table(header, rows, empty="no schedules"))


@schedules.command("add")
@click.argument("name")
@click.argument("command")
@click.option("--cron", required=True, help='Five cron fields, e.g. "*/5 * * * *".')
@click.option("--args", metavar="JSON-ARRAY", callback=json_of(list), help="Positional arguments of COMMAND.")
@click.option("--kwargs", metavar="JSON-OBJECT", callback=json_of(dict), help="Keyword arguments of COMMAND.")
@click.option("--timezone", default="UTC", show_default=True, help="IANA time zone the cron fields are read in.")
@click.option("--unique", is_flag=True, help="Skip a tick while the previous tick's command is not final.")
@click.option("--disabled", is_flag=True, help="Create it switched off.")
@click.option("--tenant", default=None, help="The tenant of the commands it pushes.")
@click.option("--target", default=None, help="The target (queue) of the commands it pushes.")
@json_option
@click.pass_context
def schedules_add(
    ctx: click.Context,
    name: str,
    command: str,
    cron: str,
    args: list[Any],
    kwargs: dict[str, Any],
    timezone: str,
    unique: bool,
    disabled: bool,
    tenant: str | None,
    target: str | None,
    as_json: bool,
) -> None:
    """Create or replace schedule NAME: push COMMAND with --args/--kwargs at every tick of --cron."""
    outbox = _outbox(ctx)
    call = outbox.app.signature(command, args=args, kwargs=kwargs, options={"target": target} if target else None)
    info = outbox.put_schedule(name, call, cron, timezone=timezone, enabled=not disabled, unique=unique, tenant=tenant)
    emit(as_json, info.to_json(), describe_schedule(info))


@schedules.command("show")
@click.argument("name")
@json_option
@click.pass_context
def schedules_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """One schedule: what it pushes, when, and its last run."""
    info = _outbox(ctx).schedule(name)
    emit(as_json, info.to_json(), describe_schedule(info))


@schedules.command("delete")
@click.argument("name")
@click.pass_context
def schedules_delete(ctx: click.Context, name: str) -> None:
    """Delete a schedule; the commands it already pushed are kept."""
    if not _outbox(ctx).delete_schedule(name):
        raise click.ClickException(f"no schedule named {name!r}")
    click.echo(f"deleted schedule {name!r}")


@schedules.command("enable")
@click.argument("name")
@click.pass_context
def schedules_enable(ctx: click.Context, name: str) -> None:
    """Switch a schedule on; it counts from now (the ticks missed while it was off are not caught up)."""
    switch_schedule(ctx, name, enabled=True)


@schedules.command("disable")
@click.argument("name")
@click.pass_context
def schedules_disable(ctx: click.Context, name: str) -> None:
    """Switch a schedule off."""
    switch_schedule(ctx, name, enabled=False)


@schedules.command("tick")
@json_option
@click.pass_context
def schedules_tick(ctx: click.Context, as_json: bool) -> None:
    """Push the commands of the schedules due now (beat does it every outbox_schedule_interval)."""
    done = _outbox(ctx).tick_schedules()
    rows = [
        (d["name"], d["command_id"] or f"skipped: the previous command is {d['skipped']}", when(d["next_run_at"]))
        for d in done
    ]
    emit(as_json, done, table(("schedule", "command", "next run"), rows, empty="no schedule was due"))


def switch_schedule(ctx: click.Context, name: str, *, enabled: bool) -> None:
    """Enable or disable a schedule and say when it runs next."""
    info = _outbox(ctx).enable_schedule(name, enabled)
    next_run = f"; next run at {when(info.next_run_at)}" if info.enabled else ""
    click.echo(f"schedule {name!r} is {'enabled' if info.enabled else 'disabled'}{next_run}")


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
    if info.error is None:
        return "-"
    text = " ".join(f"{info.error.type}: {info.error.message}".split())
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


if __name__ == "__main__":  # pragma: no cover
    main()
