"""The final state of a command in the app's Celery result backend, when no worker request writes it.

A command's Celery task id is its command id, so ``AsyncResult(str(command_id))``
follows it. On the worker, Celery's own tracer stores ``SUCCESS``, ``RETRY`` and
``FAILURE`` for each attempt and the outbox's request class stores ``REVOKED``. The
endings that happen elsewhere — a cancel of a command that was not running, an expiry
in the database, a lapsed attempt settled by the rescuer, a row the relay refuses —
are stored here. Nothing is written when the app has no result backend or the task
ignores its result; a backend that fails is logged and never stops the outbox.
"""

from __future__ import annotations

import builtins
import logging
import uuid
from typing import Any

from celery import Celery
from celery.backends.base import DisabledBackend

from .store import ErrorInfo

log = logging.getLogger("orch_outbox.results")


class Results:
    """Writes final states of commands to the app's result backend."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def _stores(self, name: str) -> bool:
        try:
            backend = self.app.backend
        except Exception as exc:  # a misconfigured backend fails the same way for Celery's own tasks
            log.debug("no result backend: %s", exc)
            return False
        if isinstance(backend, DisabledBackend):
            return False
        task = self.app.tasks.get(name)
        ignore = getattr(task, "ignore_result", None)
        return not (self.app.conf.task_ignore_result if ignore is None else ignore)

    def failed(self, command_id: uuid.UUID, name: str, error: ErrorInfo) -> None:
        """``FAILURE`` with an exception of the recorded type (rebuilt by Celery on ``.get()``)."""
        if self._stores(name):
            self._write(lambda b: b.mark_as_failure(str(command_id), exception_of(error), error.traceback))

    def revoked(self, command_id: uuid.UUID, name: str, reason: str) -> None:
        """``REVOKED`` (a cancellation or an expiry), as Celery records a revoked task."""
        if self._stores(name):
            self._write(lambda b: b.mark_as_revoked(str(command_id), reason))

    def _write(self, write: Any) -> None:
        try:
            write(self.app.backend)
        except Exception as exc:
            log.warning("could not store a result in the result backend: %s", exc)


def exception_of(error: ErrorInfo) -> BaseException:
    """An exception standing for a recorded error: its class named and placed as the original's.

    Celery's backends store an exception as its module, class name and message; readers
    rebuild the real class where they can import it (``builtins.ValueError``) and a
    stand-in of that name where they cannot.
    """
    module, _, name = error.type.rpartition(".")
    builtin = getattr(builtins, name, None) if module in ("", "builtins") else None
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        try:
            return builtin(error.message)
        except Exception:  # a builtin that takes other arguments: a stand-in of its name
            pass
    # Only builtins are looked up: a recorded type name comes from a row, and a row must
    # never make a process import a module (guarantee 6).
    kind: type[Exception] = type(name or "Error", (Exception,), {"__module__": module or "builtins"})
    return kind(error.message)
