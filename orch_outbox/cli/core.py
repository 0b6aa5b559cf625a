"""Migrate, status, show, cancel, relay, settings and the demo."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click

from .. import demo as demo_mod
from ..render import table
from .base import (
    _masked,
    _outbox,
    _reader,
    describe,
    emit,
    error_line,
    json_option,
    main,
    ready_outbox,
    say_which_outbox,
    when,
)

# -- migrate, status, show, cancel, relay, settings, demo --------------------------------


@main.command()
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it.")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def migrate(ctx: click.Context, sql: bool, revision: str) -> None:
    """Create or upgrade the outbox tables."""
    from .. import migrate as migrations

    outbox = _outbox(ctx)
    say_which_outbox(ctx, outbox)
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
    """Counts of commands by target and status, and the limits with what waits on them."""
    outbox = _reader(ctx)
    say_which_outbox(ctx, outbox)
    counts = outbox.store.counts()
    data: dict[str, Any] = {}
    for target, state, count in counts:
        data.setdefault(target, {})[state] = count
    text = table(("target", "status", "count"), counts, empty="the outbox is empty")
    limits = outbox.limits()
    if limits:
        rows = [(s.key, s.limit, s.in_flight, s.due, "yes" if s.held else "no") for s in limits]
        text += "\nlimits:\n" + table(("limit", "in force", "in flight", "due", "holding back"), rows)
        held = sum(s.due for s in limits if s.held)
        text += f"\n{held} due command(s) wait on a limit"
    data_out = {"targets": data, "limits": [dataclasses.asdict(s) for s in limits]} if limits else data
    emit(as_json, data_out, text)


@main.command()
@click.argument("command_id")
@json_option
@click.pass_context
def show(ctx: click.Context, command_id: str, as_json: bool) -> None:
    """One command: state, attempts, output or error, and the commands chained from it."""
    outbox = _reader(ctx)
    info = outbox.get(command_id)
    children = outbox.children(info.id)
    attempts = outbox.attempts(info.id)
    text = describe(info)
    if attempts:
        rows = [
            (
                a.attempt,
                a.worker or "-",
                when(a.started_at),
                when(a.finished_at),
                a.outcome or "-",
                error_line(a.error),
            )
            for a in attempts
        ]
        text += "\nattempts:\n" + table(("attempt", "worker", "started", "finished", "outcome", "error"), rows)
    if children:
        text += "\nchained:\n" + table(("id", "name", "status"), [(c.id, c.name, c.status) for c in children])
    data = {**info.to_json(), "attempts": [a.to_json() for a in attempts], "children": [c.to_json() for c in children]}
    emit(as_json, data, text)


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
    outbox, stop = ready_outbox(ctx)
    if outbox.store.can_listen:
        click.echo(
            f"relaying on NOTIFY {outbox.settings.table_prefix}commands, polling every "
            f"{outbox.settings.poll_interval}s as the fallback"
        )
        outbox.listening_relay(stop).run()
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
    from ..settings import describe as describe_settings

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
