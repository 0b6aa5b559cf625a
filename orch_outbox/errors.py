"""The exceptions orch_outbox raises.

One root, :class:`OutboxError`. Each subclass's docstring is its default message, so
``raise InvalidInput()`` already says something useful; pass a message to be precise.
Driver errors are translated at the store's boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class OutboxError(Exception):
    """orch_outbox failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(OutboxError):
    """A setting has an invalid value."""


class InvalidInput(OutboxError, ValueError):
    """The command's arguments cannot be stored as JSON."""


class InvalidOption(OutboxError, ValueError):
    """A push option is unknown or has an invalid value."""


class UnknownCommand(OutboxError, LookupError):
    """No command is registered under that name."""


class CommandNotFound(OutboxError, LookupError):
    """No command with that id exists in the outbox."""


class InvalidTransition(OutboxError):
    """The command is not in a state that allows this operation."""


class StoreUnavailable(OutboxError):
    """The outbox database cannot be reached."""


class CommandTimeout(BaseException):
    """The handler ran past its timeout.

    Derived from ``BaseException`` (like ``KeyboardInterrupt``) so that a handler's
    ``except Exception`` cannot swallow it by accident.
    """


class CommandCanceled(BaseException):
    """The command was canceled while its handler ran.

    Raised inside the handler (promptly, from a cancel request, or at its next
    ``current().heartbeat()``). A ``BaseException`` for the same reason as
    :class:`CommandTimeout`; let it propagate and the attempt ends ``canceled``.
    """


class LeaseLost(OutboxError):
    """The attempt no longer holds its command (its lease lapsed and it was rescued, or it finished)."""


class UniqueConflict(OutboxError):
    """An unfinished command already holds this unique key, with another name or input."""


class BatchClosed(OutboxError):
    """The batch is finished or canceled: no member can be added to it."""


class BatchNotFound(OutboxError, LookupError):
    """No batch with that id exists in the outbox."""


class ScheduleNotFound(OutboxError, LookupError):
    """No schedule with that name exists in the outbox."""


class LeaseExpired(OutboxError):
    """The attempt stopped reporting: its worker died, hung, or was cut off from the database."""


class ChainedPush(OutboxError):
    """A chained canvas or a callback cannot be sent with ``apply_async``: push it with ``outbox.push``."""


class JobNotFound(OutboxError, LookupError):
    """No job with that name or id exists in the outbox."""


class WorkerLeaving(OutboxError):
    """The worker running this job is shutting down: the job is handed to another worker."""


class WorkerNotFound(OutboxError, LookupError):
    """No worker with that name is in the registry."""


class TablesMissing(OutboxError):
    """The outbox tables are missing in this database: run ``orch-outbox migrate``."""
