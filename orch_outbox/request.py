"""The worker-side request class of outbox attempts: Celery's events, logs and results tell the truth.

The executor ends each attempt the way Celery's tracer understands: it returns the
output (``SUCCESS``), raises :class:`celery.exceptions.Retry` once a retry is recorded
(``RETRY``), raises the handler's own exception once the failure is recorded
(``FAILURE``, with its traceback), or raises one of the two ``Ignore`` kinds below. This
request class, which Celery builds for every message of an outbox task, turns those into
what Flower and the result backend should see:

- :class:`CommandRevoked` (a cancellation, or an expiry at the start): ``REVOKED`` —
  Celery's ``task-revoked`` event and ``mark_as_revoked``, as for ``celery revoke``;
- :class:`AttemptDropped` (a duplicate, late, paused or malformed message): nothing at
  all — it ran nothing, so it reports no outcome of anything;
- a pool child that the watchdog ended because its handler ran past its timeout (prefork
  only, see ``running.py``): the outcome that child recorded first, ``RETRY`` or
  ``FAILURE``, instead of Celery's ``WorkerLostError``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import Ignore, Retry, WorkerLostError
from celery.utils.saferepr import saferepr
from celery.worker.request import Request
from celery.worker.state import task_ready

from .store import ErrorInfo

log = logging.getLogger("orch_outbox.request")

#: Per app: reads whether a lost child had recorded a retry of the attempt a header names.
WATCHDOG_READERS: weakref.WeakKeyDictionary[Celery, Callable[[Any], ErrorInfo | None]] = weakref.WeakKeyDictionary()


class CommandRevoked(Ignore):  # type: ignore[misc]
    """The attempt ended ``canceled`` (or ``expired``): the task is reported ``REVOKED``."""

    def __init__(self, reason: str = "canceled", expired: bool = False) -> None:
        super().__init__(reason, expired)
        self.reason = reason
        self.expired = expired


class AttemptDropped(Ignore):  # type: ignore[misc]
    """The message ran nothing (not this attempt's to run): no outcome is reported for it."""


class OutboxRequest(Request):  # type: ignore[misc]
    """Celery's request, reporting the outbox's endings truthfully (see the module docstring)."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = _unwrap(exc_info.exception)
        if isinstance(exc, CommandRevoked):
            if not self._already_revoked:
                self._announce_revoked(exc.reason, False, None, exc.expired)
            return None
        if isinstance(exc, WorkerLostError) and self._ended_by_watchdog():
            return None
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _ended_by_watchdog(self) -> bool:
        """True if the lost child had recorded a retry of this attempt (the watchdog ends a child after that)."""
        header = self._request_dict.get("outbox")
        reader = WATCHDOG_READERS.get(self.task.app)
        if not header or reader is None:
            return False
        try:
            error = reader(header)
        except Exception as exc:  # the database is away: report Celery's own view
            log.warning("could not read how %s[%s] ended: %s", self.name, self.id, exc)
            return False
        if error is None:
            return False
        retry = Retry(message=error.message, exc=None)
        self.task.backend.mark_as_retry(self.id, retry, error.traceback, request=self._context)
        self.send_event("task-retried", exception=saferepr(error.message), traceback=error.traceback or "")
        task_ready(self)
        self.acknowledge()
        return True


def _unwrap(exc: Any) -> Any:
    inner = getattr(exc, "exc", None)
    return inner if type(exc).__name__ == "ExceptionWithTraceback" and inner is not None else exc
