"""Batches and tenants, pause and resume, the dead letters and retention."""

from __future__ import annotations

from typing import Any

import click

from ..render import table
from ..schema import BATCH_STATUSES, FINAL_STATUSES
from .base import (
    _outbox,
    _reader,
    commands_table,
    counted,
    describe_batch,
    emit,
    fields,
    filter_options,
    json_option,
    main,
    paging_options,
    percent,
    scope_of,
    scope_options,
    scope_text,
    when,
)

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
    found = _reader(ctx).batches(tenant=tenant, status=status, limit=limit, offset=offset)
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
    outbox = _reader(ctx)
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
    stats = _reader(ctx).tenant_stats(tenant)
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
    found = _reader(ctx).paused()[offset : offset + limit]
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
    found = _reader(ctx).failed(name=name, target=target, tenant=tenant, limit=limit, offset=offset)
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
