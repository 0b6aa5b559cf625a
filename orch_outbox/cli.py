"""``orch-outbox``: migrate the database, run the demo, read and cancel commands.

Every command works on the ready app (configured from ``celeryconfig`` and
``ORCH_OUTBOX_*``) unless ``-A module:attr`` names a Celery app or an Outbox.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from kombu.utils.imports import symbol_by_name

from .errors import OutboxError
from .outbox import CommandInfo, Outbox, outbox_of


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


@click.group()
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Counts of commands by target and status."""
    counts = _outbox(ctx).store.counts()
    if as_json:
        data: dict[str, dict[str, int]] = {}
        for target, state, count in counts:
            data.setdefault(target, {})[state] = count
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    rows = [(target, state, str(count)) for target, state, count in counts]
    click.echo(table(("target", "status", "count"), rows) if rows else "the outbox is empty")


@main.command()
@click.argument("command_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def show(ctx: click.Context, command_id: str, as_json: bool) -> None:
    """One command: state, attempts, output or error, and the commands chained from it."""
    outbox = _outbox(ctx)
    try:
        info = outbox.get(command_id)
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from exc
    children = outbox.children(info.id)
    if as_json:
        data = info.to_json()
        data["children"] = [c.to_json() for c in children]
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(describe(info))
    if children:
        click.echo("chained:")
        click.echo(table(("id", "name", "status"), [(str(c.id), c.name, c.status) for c in children]))


@main.command()
@click.argument("command_id")
@click.pass_context
def cancel(ctx: click.Context, command_id: str) -> None:
    """Cancel a command: at once if pending or dispatched; a running one is interrupted by its worker."""
    outbox = _outbox(ctx)
    try:
        done = outbox.cancel(command_id)
        status = outbox.get(command_id).status
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from exc
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
        (key, env, repr(getattr(outbox.settings, key[len("outbox_") :])))
        for key, env, _default, _meaning in describe_settings()
    ]
    click.echo(table(("setting", "environment variable", "value"), rows))


@main.command()
@click.option("--home", default=None, help="Folder for the demo's SQLite file and broker (default: a temp folder).")
def demo(home: str | None) -> None:
    """Run the whole loop on the embedded default and print the final states."""
    from .demo import run

    sys.exit(run(home))


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
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]] | list[Any]) -> str:
    """A plain-text table."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    main()
