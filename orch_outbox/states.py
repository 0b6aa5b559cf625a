"""A command's states and outcomes as types, and the state changes allowed between them (DESIGN's lifecycle).

Every statement of the store that changes a command's ``status`` names the states it
expects and the one it writes; ``tests/unit/test_states.py`` reads each of them and
checks the change is one of :data:`TRANSITIONS`.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Where a command is in its life (the ``status`` column)."""

    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        """True for a state the command never leaves by itself."""
        return self in FINAL


class AttemptOutcome(StrEnum):
    """How the last attempt ended (the ``outcome`` column)."""

    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    NOT_FOUND = "not_found"
    LOST = "lost"
    EXPIRED = "expired"


class Kind(StrEnum):
    """What a row is (the ``kind`` column; NULL for an ordinary command)."""

    JOB = "job"


class BatchStatus(StrEnum):
    """A batch's state (the batches table's ``status``)."""

    OPEN = "open"
    FINISHED = "finished"
    CANCELED = "canceled"


FINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELED, Status.EXPIRED})
UNFINISHED = frozenset({Status.PENDING, Status.DISPATCHED, Status.RUNNING})

#: The state changes a command may make: from a state, to the states it may be written into.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    # claimed by the relay; expired at the claim; canceled before any worker saw it; a job
    # claimed by the worker that runs it (jobs never pass through the broker)
    Status.PENDING: frozenset({Status.DISPATCHED, Status.EXPIRED, Status.CANCELED, Status.RUNNING}),
    # a worker starts it; the publish failed or the message was lost, or it was paused (back to
    # pending, no retry used); an unknown name at the worker (retried or failed); a row the relay
    # refuses (failed); expired before it started; canceled
    Status.DISPATCHED: frozenset({Status.RUNNING, Status.PENDING, Status.FAILED, Status.EXPIRED, Status.CANCELED}),
    # the attempt's ending: success, retry (pending), failure, cancellation
    Status.RUNNING: frozenset({Status.COMPLETED, Status.PENDING, Status.FAILED, Status.CANCELED}),
    # an operator re-queues a dead letter; a chord body whose members did not all complete fails
    Status.FAILED: frozenset({Status.PENDING}),
    Status.COMPLETED: frozenset(),
    Status.CANCELED: frozenset(),
    Status.EXPIRED: frozenset(),
}
