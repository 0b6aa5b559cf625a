"""The job runner: the long-running jobs of one worker, each in a thread of its own.

A job is a row of the commands table (``kind = 'job'``) that never passes through the
broker: the worker that runs it claims it (pending → running) when it has room, so a
worker never holds more than ``outbox_max_jobs`` and jobs beyond the cluster's room wait
pending; a worker that joins takes waiting jobs at its next renewal. The runner is driven
by the worker's registry renewals (``workers.Presence``), every ``outbox_worker_heartbeat``:

- it claims due jobs of the worker's queues, up to its free room;
- a job asked to stop (stopped, canceled, the worker leaving) sees ``current().canceled``
  and ``CommandCanceled`` at its heartbeat; when it returns, its ending is recorded:
  canceled (with ``if_canceled``), completed, restarted with backoff after it raised
  (``outbox_job_retries``), or handed back to pending at once (the worker is leaving);
- cut off from the database for half of ``outbox_worker_timeout``, the worker stops its
  jobs before the reaper may give them to another worker, and hands them back when the
  database answers again (if the reaper has not already).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .context import CommandContext, _set, context_of
from .errors import CommandCanceled, LeaseLost, StoreUnavailable, WorkerLeaving
from .executor import ChainedRows, attempt_of, error_of
from .jsoncodec import decode_arguments, encode
from .running import RUNNING, Cooperative, Entry
from .settings import Settings
from .settle import Settler
from .store import ErrorInfo, Started, Store
from .task import Outcome, handler_of

log = logging.getLogger("orch_outbox.jobs")

LOST = ErrorInfo("WorkerLost", "the job's worker left or was cut off; the job starts again on a worker with room")


@dataclass
class _Running:
    started: Started
    guard: Cooperative
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)


class JobRunner:
    """Claims and runs the jobs of one worker (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        settler: Settler,
        chained_rows: ChainedRows,
        task_of: Callable[[str], Any],
        worker: str,
        targets: Sequence[str],
        capacity: int,
    ) -> None:
        self.store = store
        self.settings = settings
        self.settler = settler
        self._chained_rows = chained_rows
        self._task_of = task_of
        self.worker = worker
        self.targets = tuple(targets)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._running: dict[tuple[uuid.UUID, int], _Running] = {}
        #: jobs this worker stopped and must still hand back (the database was away)
        self._to_release: set[tuple[uuid.UUID, int]] = set()
        self.leaving = False

    @property
    def lease(self) -> float:
        """A running job's lease, renewed every second while it runs (a safety net behind the registry)."""
        return max(self.settings.lock_buffer, self.settings.worker_timeout)

    # -- driven by the registry renewals ---------------------------------------------------

    def beat(self, connected: bool, cut_off_for: float) -> None:
        """After a renewal: stop the jobs when cut off too long; else hand back, then claim up to the free room."""
        if not connected:
            if cut_off_for >= self.settings.worker_timeout / 2:
                stopped = self.stop_all(LeaseLost)
                if stopped:
                    log.warning("jobs: cut off from the database for %.1fs; stopped %d job(s)", cut_off_for, stopped)
            return
        self._release_stopped()
        if not self.leaving:
            self.claim()

    def claim(self) -> int:
        """Claim and start due jobs up to the free room; returns how many started."""
        free = self.capacity - self.holding()
        if free <= 0:
            return 0
        try:
            claimed = self.store.claim_jobs(self.worker, self.targets, free, self.lease)
        except StoreUnavailable as exc:
            log.warning("jobs: cannot claim: %s", exc)
            return 0
        for started in claimed:
            self._start(started)
        return len(claimed)

    def holding(self) -> int:
        """Jobs this worker runs or must still hand back."""
        with self._lock:
            return len(self._running) + len(self._to_release)

    def running(self) -> list[Started]:
        """The jobs running here."""
        with self._lock:
            return [r.started for r in self._running.values()]

    def stop_all(self, reason: type[BaseException]) -> int:
        """Ask every job running here to stop, for ``reason``; returns how many were asked."""
        with self._lock:
            entries = list(self._running.values())
        return sum(1 for r in entries if r.guard.interrupt(reason))

    def leave(self, timeout: float) -> None:
        """Warm shutdown: stop every job, wait up to ``timeout`` for them, hand them back to pending."""
        self.leaving = True
        self.stop_all(WorkerLeaving)
        deadline = time.monotonic() + timeout
        with self._lock:
            entries = list(self._running.values())
        for r in entries:
            if not r.done.wait(max(deadline - time.monotonic(), 0.0)):
                log.warning("jobs: %s did not stop within %.0fs; handing it back anyway", r.started.id, timeout)
                with self._lock:
                    self._running.pop((r.started.id, r.started.attempt), None)
                    self._to_release.add((r.started.id, r.started.attempt))
        self._release_stopped()

    # -- one job ---------------------------------------------------------------------------

    def _start(self, started: Started) -> None:
        running = _Running(started, Cooperative())
        with self._lock:
            self._running[(started.id, started.attempt)] = running
        thread = threading.Thread(target=self._run, args=(running,), name=f"orch-outbox-job-{started.id}", daemon=True)
        running.thread = thread
        thread.start()

    def _run(self, running: _Running) -> None:
        started, guard = running.started, running.guard
        try:
            self._execute(started, guard)
        except Exception:
            log.exception("jobs: recording the end of %s failed; its lease will return it", started.id)
        finally:
            with self._lock:
                self._running.pop((started.id, started.attempt), None)
            running.done.set()

    def _execute(self, started: Started, guard: Cooperative) -> None:
        task = self._task_of(started.name)
        if task is None:
            missing = ErrorInfo("NotRegistered", f"no command named {started.name!r} is registered on this worker")
            self.settler.failed(attempt_of(started), "not_found", missing, report_result=True)
            return
        handler = handler_of(task)
        try:
            args, kwargs = decode_arguments(handler.signature, handler.hints, started.input)
        except Exception as exc:  # the stored input cannot feed this handler: restarting will not help
            self.settler.failed(attempt_of(started), "failure", error_of(exc), retry=False, report_result=True)
            return
        key = RUNNING.add(Entry(started.id, started.attempt, guard, self._renew, lambda: None, float("inf")))
        _set(self._context(started, guard))
        error: BaseException | None = None
        result: Any = None
        log.info("job %s[%s] attempt %s started on %s", started.name, started.id, started.attempt, self.worker)
        try:
            with guard:
                result = handler.run(*args, **kwargs)
        except (CommandCanceled, LeaseLost) as exc:
            error = exc if guard.fired is None else None
        except Exception as exc:
            error = exc
        finally:
            _set(None)
            RUNNING.remove(key)
        self._ended(task, started, guard.fired, error, result)

    def _ended(
        self, task: Any, started: Started, reason: type[BaseException] | None, error: BaseException | None, result: Any
    ) -> None:
        pair = (started.id, started.attempt)
        if reason in (WorkerLeaving, LeaseLost) or isinstance(error, LeaseLost):
            with self._lock:
                self._to_release.add(pair)
            log.info("job %s[%s] stopped: its worker is leaving or lost its hold", started.name, started.id)
            return
        if reason is CommandCanceled or isinstance(error, CommandCanceled):
            self.settler.canceled(attempt_of(started), report_result=True)
            log.info("job %s[%s] stopped", started.name, started.id)
            return
        if error is not None:
            ending = self.settler.failed(attempt_of(started), "failure", error_of(error), report_result=True)
            log.warning(
                "job %s[%s] raised %s: %s; %s",
                started.name,
                started.id,
                type(error).__name__,
                error,
                f"restarting in {ending.delay:.1f}s" if ending.status == "pending" else f"now {ending.status}",
            )
            return
        output = encode(result, f"output of {task.name}")
        rows = self._chained_rows(task.name, "then", Outcome(started.id, task.name, started.input, result))
        self.store.complete(started.id, started.attempt, output, rows)
        log.info("job %s[%s] returned: completed", started.name, started.id)

    def _context(self, started: Started, guard: Cooperative) -> CommandContext:
        def heartbeat(seconds: float | None) -> None:
            if guard.stopped.is_set():
                raise CommandCanceled(f"job {started.id} was asked to stop")
            try:
                held, cancel = self.store.heartbeat(started.id, started.attempt, self.lease)
            except StoreUnavailable as exc:  # cut off: the registry renewals decide when the job must stop
                log.debug("job %s heartbeat: %s", started.id, exc)
                return
            if not held:
                guard.interrupt(LeaseLost)
                raise LeaseLost(f"attempt {started.attempt} of job {started.id} no longer holds it")
            if cancel:
                guard.interrupt(CommandCanceled)
                raise CommandCanceled(f"job {started.id} was stopped")

        return context_of(
            started, heartbeat, lambda: self.store.cancel_requested(started.id, started.attempt), guard.stopped
        )

    def _renew(self, attempts: list[tuple[uuid.UUID, int]]) -> dict[tuple[uuid.UUID, int], bool]:
        return self.store.renew(attempts, self.lease)

    def _release_stopped(self) -> None:
        with self._lock:
            pending = list(self._to_release)
        for command_id, attempt in pending:
            try:
                self.store.release(command_id, attempt, LOST, worker=self.worker)
            except Exception as exc:  # unreachable: tried again at the next renewal; the reaper may act first
                log.warning("jobs: cannot hand back %s yet: %s", command_id, exc)
                return
            with self._lock:
                self._to_release.discard((command_id, attempt))
