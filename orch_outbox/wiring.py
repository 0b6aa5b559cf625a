"""The outbox in a Celery app: its service tasks, beat entries and the worker signals it answers."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, beat

from .errors import ConfigurationError, StoreUnavailable
from .jobs import JobRunner
from .parts import OutboxParts
from .running import RUNNING
from .task import adopt
from .workers import Identity, Presence

log = logging.getLogger("orch_outbox")


RELAY_TASK = "orch_outbox.relay"


RESCUE_TASK = "orch_outbox.rescue"


SCHEDULE_TASK = "orch_outbox.schedules"


CLEANUP_TASK = "orch_outbox.cleanup"


LOCAL_TASKS = frozenset({RELAY_TASK, RESCUE_TASK, SCHEDULE_TASK, CLEANUP_TASK})


#: Longest wait, at warm shutdown, for the jobs to stop before they are handed back.
JOBS_LEAVE_SECONDS = 10.0

#: Longest wait, at worker exit, for the write-back to record the successes it holds.
WRITE_BACK_FLUSH_SECONDS = 10.0
#: Celery pools whose processes run one handler at a time (their thread writes the successes due, see writeback.py).
SINGLE_HANDLER_POOLS = frozenset({"celery.concurrency.prefork", "celery.concurrency.solo"})


class Wiring(OutboxParts):
    """The outbox in a Celery app: its service tasks, beat entries and the worker signals it answers."""

    def _register_service_tasks(self) -> None:
        outbox = self

        @self.app.task(name=RELAY_TASK, ignore_result=True, shared=False)
        def relay() -> int:
            return outbox.relay_once()

        @self.app.task(name=RESCUE_TASK, ignore_result=True, shared=False)
        def rescue() -> int:
            return outbox.rescue_once()

        @self.app.task(name=SCHEDULE_TASK, ignore_result=True, shared=False)
        def schedules() -> int:
            return len(outbox.tick_schedules())

        @self.app.task(name=CLEANUP_TASK, ignore_result=True, shared=False)
        def cleanup() -> int:
            return outbox.cleanup_once()

    def _add_beat_entries(self, sender: Celery | None = None, **_: Any) -> None:
        settings = self.settings
        schedule = self.app.conf.beat_schedule
        schedule.setdefault("orch-outbox-relay", {"task": RELAY_TASK, "schedule": settings.poll_interval})
        schedule.setdefault("orch-outbox-rescue", {"task": RESCUE_TASK, "schedule": settings.rescue_interval})
        schedule.setdefault("orch-outbox-schedules", {"task": SCHEDULE_TASK, "schedule": settings.schedule_interval})
        schedule.setdefault("orch-outbox-cleanup", {"task": CLEANUP_TASK, "schedule": settings.cleanup_interval})
        accepted = {str(c) for c in (self.app.conf.accept_content or ())}
        unsafe = sorted(accepted - {"json", "application/json"})
        if unsafe:
            # Commands are always published as JSON; a worker that also accepts pickle can be
            # made to run code by anyone able to write to the broker.
            log.warning(
                "app %r accepts %s besides JSON; set accept_content = ['json'] so workers refuse other payloads",
                self.app.main,
                unsafe,
            )

    def _check_at_start(self, sender: Any = None, **_: Any) -> None:
        """A worker or beat of this app refuses to start on invalid settings.

        SystemExit, because Celery logs and swallows ordinary exceptions of signal handlers.
        """
        if getattr(sender, "app", None) is not self.app:
            return
        try:
            self.settings  # noqa: B018 - reading validates
        except ConfigurationError as exc:
            raise SystemExit(f"orch_outbox: invalid settings: {exc}") from None
        problem = self.database_problem()
        if problem:
            raise SystemExit(f"orch_outbox: {problem}")
        url = self.engine.url.render_as_string(hide_password=True)
        log.info("outbox database ready: %s (tables %s*)", url, self.settings.table_prefix)

    def database_problem(self) -> str | None:
        """One line saying why the outbox database cannot serve (unreachable, tables missing), or None."""
        url = self.engine.url.render_as_string(hide_password=True)
        try:
            missing = self.store.missing_tables()
        except StoreUnavailable as exc:
            return f"cannot reach the outbox database {url}: {exc}"
        if missing:
            return f"the outbox tables are missing in {url} ({', '.join(missing)}): run `orch-outbox migrate`"
        return None

    def _adopt_plain_tasks(self, sender: Any = None, **_: Any) -> None:
        """At worker start: let this app's plain Celery tasks run outbox rows (see ``task.adopt``)."""
        if getattr(sender, "app", None) is not self.app or not self.settings.plain_tasks:
            return
        self.adopt_plain_tasks()

    def adopt_plain_tasks(self) -> int:
        """Wrap the plain Celery tasks of this app so that rows naming them run fenced; returns how many."""
        adopted = 0
        for name, task in list(self.app.tasks.items()):
            if name.startswith(("celery.", "orch_outbox.")):
                continue
            adopted += adopt(task, lambda t, request: self.executor.execute(t, request))
        return adopted

    def _start_write_back(self, sender: Any = None, **_: Any) -> None:
        """In a worker of this app: plain successes are written behind the handlers (see ``_WriteBack``).

        Every pool gains: a prefork or solo process takes its next message without waiting
        for the last one's WAL flush; the threads of a threads pool share flushes.
        """
        if getattr(sender, "app", None) is self.app:
            pool = getattr(getattr(sender, "pool_cls", None), "__module__", "")
            self.executor.start_write_back(one_handler_thread=pool in SINGLE_HANDLER_POOLS)

    def _join_registry(self, sender: Any = None, **_: Any) -> None:
        """At worker start: this worker's identity in the registry, and its job runner (see workers.py, jobs.py).

        The row is written, and renewed from a thread, once the pool is up (``worker_ready``;
        at once for pools that do not fork), so no pool process is forked while it runs.
        """
        if getattr(sender, "app", None) is not self.app:
            return
        settings = self.settings
        queues = _consumed_queues(self.app)
        pool = _pool_name(getattr(sender, "pool_cls", None))
        identity = Identity.of(
            str(getattr(sender, "hostname", None) or "celery"),
            pool,
            int(getattr(sender, "concurrency", 0) or 0),
            queues,
            settings.max_jobs,
        )
        runner = None
        if settings.max_jobs > 0:
            runner = JobRunner(
                self.store,
                settings,
                self.settler,
                self.chained_rows,
                lambda name: (self.app.tasks or {}).get(name),
                identity.name,
                queues,
                settings.max_jobs,
            )
        self.runner = runner
        self.presence = Presence(
            self.store,
            settings,
            identity,
            runner.beat if runner is not None else None,
            self.reaper.returned_by_restart,
        )
        if pool != "prefork":
            self._start_presence(sender)

    def _serve_metrics(self, sender: Any = None, **_: Any) -> None:
        """``outbox_metrics_port``: a worker's (or beat's) main process serves its metrics for Prometheus.

        Beat also serves the backlog gauges (one process per cluster runs their queries).
        """
        if getattr(sender, "app", None) is not self.app or not self.settings.metrics_port:
            return
        from . import metrics

        metrics.serve(self.settings.metrics_port)
        if isinstance(sender, beat.Service):
            reads = self.reads
            backlog = metrics.Backlog(reads.store, self.settings.metrics_interval, reads.relay.plan)
            metrics.observe_backlog(backlog)
            backlog.start()

    def _serve_child_metrics(self, **_: Any) -> None:
        """In a prefork pool process: its own metrics on ``outbox_metrics_port`` + its pool index + 1."""
        if not self.settings.metrics_port or self.presence is None:
            return
        from billiard.process import current_process

        from . import metrics

        index = int(getattr(current_process(), "index", 0) or 0)
        metrics.serve(self.settings.metrics_port + 1 + index)

    def _start_presence(self, sender: Any = None, **_: Any) -> None:
        presence = self.presence
        if presence is None or presence._thread is not None:
            return
        owner = getattr(sender, "app", None) or getattr(getattr(sender, "controller", None), "app", None)
        if owner is not None and owner is not self.app:
            return
        presence.start()

    def _leave_registry(self, sender: Any = None, **_: Any) -> None:
        """Warm shutdown: hand the jobs back at once, then leave the registry."""
        if sender is not None and getattr(sender, "app", None) is not self.app:
            return
        runner, presence = self.runner, self.presence
        self.runner = self.presence = None
        if runner is not None:
            runner.leave(JOBS_LEAVE_SECONDS)
        if presence is not None:
            presence.leave()

    def _flush_write_back(self, sender: Any = None, **_: Any) -> None:
        """Before a worker (or a prefork child) exits: write back the successes still held."""
        executor = self.__dict__.get("executor")
        if executor is not None and not executor.flush(WRITE_BACK_FLUSH_SECONDS):
            log.warning("exiting with completions not yet written; their attempts will be retried")

    def _after_fork(self, **_: Any) -> None:
        """In a prefork child: never reuse database connections opened by the parent; arm the watchdog."""
        RUNNING.in_pool_child = True
        engine = self.__dict__.get("engine")
        if engine is not None:  # the store's autocommit engine shares this pool
            engine.dispose(close=False)
        store = self.__dict__.get("store")
        if store is not None:
            store.after_fork()

    def _on_task_unknown(self, sender: Any = None, message: Any = None, name: str = "", id: str = "", **_: Any) -> None:
        header = (getattr(message, "headers", None) or {}).get("outbox")
        if sender is not None and getattr(sender, "app", None) is not self.app:
            return
        if header:
            self.executor.record_not_found(header, name)


def _consumed_queues(app: Celery) -> list[str]:
    """The queues this worker consumes, in the order of ``-Q`` (the order ``outbox_strict_order`` serves them in),
    else the app's queues."""
    queues = app.amqp.queues
    chosen = getattr(queues, "consume_from", None) or queues
    return list(dict.fromkeys(str(name) for name in chosen))


def _pool_name(pool_cls: Any) -> str:
    """``prefork``, ``threads``, ``solo``, ... of a worker's pool class (or its alias)."""
    if isinstance(pool_cls, str):
        return pool_cls.rsplit(":", 1)[0].rsplit(".", 1)[-1].lower()
    module = getattr(pool_cls, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] or "unknown"


class QuietServices(logging.Filter):
    """Demotes to DEBUG the INFO lines Celery writes for the outbox's own service tasks.

    Beat sends the relay, rescuer, schedules and cleanup entries every second or so, and
    a worker that runs them logs each receipt and success: lines that would bury the
    user's own. Every other task's lines pass unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not _names_a_service(record.args):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _names_a_service(args: Any) -> bool:
    values = args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else ()
    return any(isinstance(v, str) and v.startswith(("orch_outbox.", "orch-outbox-")) for v in values)


#: Celery's loggers of "Sending due task", "Task ... received" and "Task ... succeeded".
SERVICE_LOGGERS = ("celery.beat", "celery.worker.strategy", "celery.app.trace")
_QUIET = QuietServices()
for _name in SERVICE_LOGGERS:
    logging.getLogger(_name).addFilter(_QUIET)
