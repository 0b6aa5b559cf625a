"""``orch-outbox workers``, ``jobs`` and ``list``: the worker registry, long-running jobs, commands by state."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import click

from ..models import CommandInfo, JobInfo, WorkerInfo
from ..operations import BULK_ACTIONS
from ..render import table
from ..schema import STATUSES
from ..store import SORTS, Search
from .base import _outbox, _reader, commands_table, emit, fields, json_option, main, paging_options, ready_outbox, when

#: Most rows one ``bulk`` may touch.
BULK_LIMIT = 10_000


def _shown(shown: int, offset: int, total: int) -> str:
    """``(1-20 of 35)``: which rows of how many a page holds."""
    return f"({offset + 1}-{offset + shown} of {total})" if shown else f"(none of {total})"


def _worker_lines(worker: WorkerInfo) -> list[tuple[str, Any]]:
    return [
        ("worker", worker.name),
        ("host", f"{worker.hostname} (pid {worker.pid})"),
        ("pool", f"{worker.pool} -c {worker.concurrency}"),
        ("queues", ", ".join(worker.queues) or "-"),
        ("jobs", f"{len(worker.jobs)} of {worker.max_jobs}"),
        ("version", worker.version),
        ("started", when(worker.started_at)),
        ("last seen", when(worker.last_seen_at)),
    ]


def _running_table(worker: WorkerInfo) -> str:
    rows = [(r.id, r.kind, r.name, r.status, r.attempt, when(r.started_at)) for r in worker.running]
    return table(("id", "kind", "name", "status", "attempt", "started"), rows, empty="  running nothing")


@main.command()
@click.argument("name", required=False)
@paging_options
@json_option
@click.pass_context
def workers(ctx: click.Context, name: str | None, limit: int, offset: int, as_json: bool) -> None:
    """Live workers (the registry) with what each runs now; NAME: one worker, by nodename."""
    outbox = _reader(ctx)
    if name is not None:
        worker = outbox.worker(name)
        emit(as_json, worker.to_json(), fields(_worker_lines(worker)) + "\n\n" + _running_table(worker))
        return
    page = outbox.workers(limit=limit, offset=offset)
    rows = [
        (w.name, w.hostname, w.pid, f"{w.pool} -c {w.concurrency}", ",".join(w.queues), len(w.running),
         f"{len(w.jobs)}/{w.max_jobs}", when(w.last_seen_at))
        for w in page
    ]  # fmt: skip
    text = table(("worker", "host", "pid", "pool", "queues", "running", "jobs", "last seen"), rows, empty="no workers")
    emit(
        as_json,
        {"total": page.total, "workers": [w.to_json() for w in page]},
        f"{text}\n{_shown(len(page), offset, page.total)}",
    )


@main.group()
def jobs() -> None:
    """Long-running jobs: list, start, stop and show them."""


def _jobs_table(found: list[JobInfo]) -> str:
    rows = [
        (j.name, j.id, j.command, j.target, j.status, j.attempt, j.worker or "-", when(j.started_at)) for j in found
    ]
    return table(("job", "id", "command", "target", "status", "attempt", "worker", "started"), rows, empty="no jobs")


@jobs.command("list")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only jobs in this state.")
@click.option("--worker", default=None, help="Only the jobs of this worker (its nodename).")
@paging_options
@json_option
@click.pass_context
def jobs_list(
    ctx: click.Context, status: str | None, worker: str | None, limit: int, offset: int, as_json: bool
) -> None:
    """Jobs, newest first."""
    page = _reader(ctx).jobs.list(status=status, worker=worker, limit=limit, offset=offset)
    text = f"{_jobs_table(page.items)}\n{_shown(len(page), offset, page.total)}"
    emit(as_json, {"total": page.total, "jobs": [j.to_json() for j in page]}, text)


@jobs.command("start")
@click.argument("name")
@click.option("--command", "command", required=True, help="The handler: a command taking name and argument.")
@click.option("--argument", default=None, help="The job's argument (a JSON value; plain text is taken as a string).")
@click.option("--target", default=None, help="The queue whose workers may run it.")
@click.pass_context
def jobs_start(ctx: click.Context, name: str, command: str, argument: str | None, target: str | None) -> None:
    """Start the job NAME (a name already pending or running is left as it is); prints its id."""
    click.echo(str(_outbox(ctx).jobs.start(name, _argument(argument), command=command, target=target)))


def _argument(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


@jobs.command("stop")
@click.argument("name_or_id")
@click.pass_context
def jobs_stop(ctx: click.Context, name_or_id: str) -> None:
    """Stop a job (its handler sees current().canceled within a second)."""
    stopped = _outbox(ctx).jobs.stop(name_or_id)
    click.echo("stopping" if stopped else "not running or pending: nothing to stop")


@jobs.command("show")
@click.argument("name_or_id")
@json_option
@click.pass_context
def jobs_show(ctx: click.Context, name_or_id: str, as_json: bool) -> None:
    """One job, by name or id."""
    job = _reader(ctx).jobs.get(name_or_id)
    lines = [
        ("job", job.name),
        ("id", job.id),
        ("command", job.command),
        ("argument", job.argument),
        ("target", job.target),
        ("status", job.status + (" (stop requested)" if job.stop_requested else "")),
        ("attempt", job.attempt),
        ("worker", job.worker or "-"),
        ("started", when(job.started_at)),
        ("finished", when(job.finished_at)),
        ("error", "-" if job.error is None else f"{job.error.type}: {job.error.message}"),
    ]
    emit(as_json, job.to_json(), fields(lines))


def search_options(func: Any) -> Any:
    """The filters of ``list`` and ``bulk`` (the web page's): state, name, target, tenant, batch, time, error text."""
    for option in reversed(
        [
            click.option("--status", type=click.Choice(STATUSES), default=None, help="Only commands in this state."),
            click.option("--name", default=None, help="Only commands of this name."),
            click.option("--target", default=None, help="Only commands of this target (queue)."),
            click.option("--tenant", default=None, help="Only this tenant's commands."),
            click.option("--batch", default=None, help="Only the members of this batch."),
            click.option("--after", default=None, help="Created at or after (ISO 8601; UTC unless it says)."),
            click.option("--before", default=None, help="Created before (ISO 8601; UTC unless it says)."),
            click.option("--error", default=None, help="Text in the error type or message."),
        ]
    ):
        func = option(func)
    return func


def _search(status: str | None, name: str | None, target: str | None, tenant: str | None, batch: str | None,
            after: str | None, before: str | None, error: str | None) -> Search:  # fmt: skip
    try:
        return Search(
            status=status,
            name=name,
            target=target,
            tenant=tenant,
            batch_id=uuid.UUID(batch) if batch else None,
            created_after=_instant(after),
            created_before=_instant(before),
            error=error,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _instant(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@main.command("list")
@search_options
@click.option("--sort", type=click.Choice(SORTS), default="created", show_default=True, help="Order of the rows.")
@paging_options
@json_option
@click.pass_context
def list_commands(ctx: click.Context, /, sort: str, limit: int, offset: int, as_json: bool, **filters: Any) -> None:
    """Commands by state (pending, running, failed, ...) and the other filters, with the total."""
    outbox = _reader(ctx)
    rows, total = outbox.store.search(_search(**filters), limit, offset, sort)
    found = [CommandInfo.from_row(r) for r in rows]
    text = f"{commands_table(found, empty='no commands')}\n{_shown(len(found), offset, total)}"
    emit(as_json, {"total": total, "commands": [c.to_json() for c in found]}, text)


@main.command()
@click.argument("action", type=click.Choice(BULK_ACTIONS))
@search_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def bulk(ctx: click.Context, /, action: str, yes: bool, **filters: Any) -> None:
    """Cancel, requeue, purge or run now every command matching the filters (at most 10 000; asks first)."""
    outbox = _outbox(ctx)
    search = _search(**filters)
    if not any(v is not None for v in vars(search).values()):
        raise click.UsageError("name at least one filter (to act on everything, say --status ...)")
    ids = outbox.store.matching_ids(search, BULK_LIMIT + 1)
    if len(ids) > BULK_LIMIT:
        raise click.ClickException(f"more than {BULK_LIMIT} commands match: narrow the filters")
    if not ids:
        click.echo("no command matches")
        return
    if not yes:
        click.confirm(f"{action} {len(ids)} command(s)?", abort=True)
    click.echo(f"{action}: {outbox.bulk(action, ids)} of {len(ids)} changed")


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=9808, show_default=True, help="Port to serve on.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.pass_context
def metrics(ctx: click.Context, port: int, address: str) -> None:
    """Serve the outbox's metrics for Prometheus (backlog by target and status, oldest pending, dead letters)."""
    from .. import metrics as metrics_mod

    outbox, stop = ready_outbox(ctx)
    try:
        server = metrics_mod.serve(port, address)
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {address}:{port}: {exc}") from None
    reads = outbox.reads
    backlog = metrics_mod.Backlog(reads.store, outbox.settings.metrics_interval, reads.relay.plan)
    metrics_mod.observe_backlog(backlog)
    backlog.start()
    click.echo(f"serving metrics on http://{address}:{port}/metrics")
    stop.wait()
    backlog.stop()
    server.shutdown()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (beyond loopback: --token).")
@click.option("--port", type=click.IntRange(1, 65535), default=9811, show_default=True, help="Port to serve on.")
@click.option("--allow-actions", is_flag=True, help="Allow cancel, requeue, delete, pause... (read-only without).")
@click.option("--token", envvar="ORCH_OUTBOX_WEB_TOKEN", default=None, help="Required of every request (basic auth).")
@click.option("--flower-url", default=None, help="Link each command to its task page in this Flower.")
@click.pass_context
def web(
    ctx: click.Context, host: str, port: int, allow_actions: bool, token: str | None, flower_url: str | None
) -> None:
    """Serve the operator's page: overview, commands, batches, schedules, workers (read-only by default)."""
    from .. import web as web_mod
    from ..errors import ConfigurationError
    from ..web.security import check_binding

    outbox = _outbox(ctx)
    problem = outbox.database_problem()
    if problem:
        raise click.ClickException(problem)
    try:
        check_binding(host, token)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    mode = "actions allowed" if allow_actions else "read-only"
    click.echo(f"serving the outbox page on http://{host}:{port}/ ({mode})")
    web_mod.serve(outbox, host, port, allow_actions=allow_actions, token=token, flower_url=flower_url)
