"""Cron schedules."""

from __future__ import annotations

from typing import Any

import click

from ..render import table
from .base import (
    _outbox,
    _reader,
    describe_schedule,
    emit,
    json_of,
    json_option,
    main,
    paging_options,
    when,
)

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
    found = _reader(ctx).schedules()[offset : offset + limit]
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
    info = _reader(ctx).schedule(name)
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
