"""How an attempt that did not succeed ends: retried with backoff, failed with its on-failure commands, or canceled.

One path for every place an attempt ends without a success — the executor on the
worker, the watchdog that stops a handler past its timeout, and the rescuer for
attempts whose worker stopped reporting — so the rules cannot drift apart:

- the backoff is computed for the real retry number (``retries - retries_left + 1``);
- a chaining hook that raises never stops the ending: the outcome is recorded without
  the hook's commands and the hook's error is kept in the message;
- the error hook and ``command_failed`` receivers hear of every recorded failure;
- the result backend learns the final state (``FAILURE``, ``REVOKED``) when no Celery
  request is there to tell it (the rescuer's path).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from . import backoff as backoff_mod
from .results import Results
from .store import ErrorInfo, Store
from .task import Outcome
from .telemetry import OFF, Telemetry

log = logging.getLogger("orch_outbox.settle")

#: ``write(fn)`` runs a store write (the executor's form retries while the database is away).
Write = Callable[[Callable[[], Any]], Any]
ChainedRows = Callable[[str, str, Outcome], list[dict[str, Any]]]
ReportFailure = Callable[..., None]


@dataclass(frozen=True)
class Attempt:
    """The attempt being ended, as the executor or the rescuer knows it."""

    id: uuid.UUID
    name: str
    attempt: int
    input: dict[str, Any]
    retries: int
    retries_left: int

    @property
    def retry_number(self) -> int:
        """Which retry the next attempt would be (1 for the first retry)."""
        return self.retries - self.retries_left + 1


@dataclass(frozen=True)
class Ending:
    """What was recorded: ``pending`` (retried after ``delay`` seconds), ``failed``, ``canceled``, or None (fenced)."""

    status: Literal["pending", "failed", "canceled"] | None
    delay: float = 0.0
    error: ErrorInfo | None = None


def _direct(write: Callable[[], Any]) -> Any:
    return write()


class Settler:
    """Ends attempts for one outbox (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        chained_rows: ChainedRows,
        report_failure: ReportFailure,
        backoff_for: Callable[[str], backoff_mod.Backoff],
        backoff_max: float,
        results: Results,
        telemetry: Telemetry = OFF,
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self._chained_rows = chained_rows
        self._report_failure = report_failure
        self._backoff_for = backoff_for
        self._backoff_max = backoff_max
        self.results = results

    def delay(self, attempt: Attempt, error_type: str) -> float:
        """Seconds before the next attempt, by the command's backoff and the real retry number."""
        policy = self._backoff_for(attempt.name)
        return backoff_mod.delay_for(policy, attempt.retry_number, error_type, self._backoff_max)

    def failed(
        self,
        attempt: Attempt,
        outcome: str,
        error: ErrorInfo,
        *,
        retry: bool = True,
        delay: float | None = None,
        min_delay: float = 0.0,
        lapsed_only: bool = False,
        write: Write = _direct,
        report_result: bool = False,
    ) -> Ending:
        """Retry the attempt (when ``retry`` and retries are left) or fail the command for good.

        ``delay``: seconds asked for by the handler (``self.retry(countdown=...)``);
        otherwise the command's backoff. ``lapsed_only``: the rescuer's fence (the lease
        must have run out). ``report_result``: also store ``FAILURE`` in the result
        backend (when no Celery request does it).
        """
        if retry and attempt.retries_left > 0:
            wait = max(self.delay(attempt, error.type) if delay is None else max(delay, 0.0), min_delay)
            recorded = write(
                lambda: self.store.retry(attempt.id, attempt.attempt, outcome, error, wait, lapsed_only=lapsed_only)
            )
            if not recorded:
                return Ending(None)
            self.telemetry.count("retried", name=attempt.name, outcome=outcome)
            self._report(attempt, outcome, error, final=False)
            return Ending("pending", wait, error)
        error, children = self._hook_rows(attempt, "if_failed", error)
        recorded = write(
            lambda: self.store.fail(attempt.id, attempt.attempt, outcome, error, children, lapsed_only=lapsed_only)
        )
        if not recorded:
            return Ending(None)
        self.telemetry.count("failed", name=attempt.name, outcome=outcome)
        self._report(attempt, outcome, error, final=True)
        if report_result:
            self.results.failed(attempt.id, attempt.name, error)
        return Ending("failed", 0.0, error)

    def canceled(
        self, attempt: Attempt, *, lapsed_only: bool = False, write: Write = _direct, report_result: bool = False
    ) -> Ending:
        """Record a running attempt as canceled, with its on-cancel commands (a raising hook adds none)."""
        _, children = self._hook_rows(attempt, "if_canceled", None)
        recorded = write(lambda: self.store.canceled(attempt.id, attempt.attempt, children, lapsed_only=lapsed_only))
        if not recorded:
            return Ending(None)
        self.telemetry.count("canceled", name=attempt.name)
        if report_result:
            self.results.revoked(attempt.id, attempt.name, "canceled")
        return Ending("canceled")

    def _hook_rows(
        self, attempt: Attempt, kind: str, error: ErrorInfo | None
    ) -> tuple[ErrorInfo, list[dict[str, Any]]]:
        """The rows the ``kind`` hooks return; a hook that raises yields none and its error joins the message."""
        outcome = Outcome(attempt.id, attempt.name, attempt.input, None, error)
        try:
            return error or _NO_ERROR, self._chained_rows(attempt.name, kind, outcome)
        except Exception as exc:
            log.exception(
                "%s hook of %s raised; recording the outcome of %s without its commands", kind, attempt.name, attempt.id
            )
            if error is None:
                return _NO_ERROR, []
            message = f"{error.message} (and the {kind} hook raised {exc!r})"
            return ErrorInfo(error.type, message, error.traceback), []

    def _report(self, attempt: Attempt, outcome: str, error: ErrorInfo, *, final: bool) -> None:
        try:
            self._report_failure(attempt.id, attempt.name, attempt.attempt, outcome, error, final=final)
        except Exception:  # the error hook is guarded already; a receiver of the signal must not stop a pass either
            log.exception("reporting the failed attempt %s of %s raised", attempt.attempt, attempt.id)


_NO_ERROR = ErrorInfo("", "")
