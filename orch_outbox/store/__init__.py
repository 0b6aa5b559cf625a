"""The store: the only package that talks SQL.

Every statement the outbox runs is a method of :class:`Store` with a one-line purpose,
in a room of its own by concern (base, hotpath, push, claims, starts, attempts, batches,
schedules, admin, listen, workers, browse, flow). Each state change names the state (and, for a worker's
write-back, the attempt) it expects, so a late, duplicate or zombie writer changes
nothing: it finds no row to update.

Time: on PostgreSQL, due times and leases are computed from the database's ``now()``,
so a host with a skewed clock changes nothing. On SQLite, which has no usable clock of
the right precision, and in tests that pass ``clock=``, the Python clock is used.
"""

from __future__ import annotations

from .admin import AdminStatements
from .attempts import AttemptStatements
from .base import Dispatch, ErrorInfo, Lapsed, Row, Started, StoreBase, make_engine
from .batches import BatchStatements
from .browse import SORTS, BrowseStatements, Search
from .claims import ClaimStatements
from .flow import FlowStatements, LimitState
from .listen import ListenStatements
from .pending import PENDING
from .push import COPY_CHUNK_ROWS, COPY_MIN_ROWS, PushStatements
from .schedules import ScheduleStatements
from .starts import StartStatements
from .workers import WorkerStatements, job_key


class Store(
    PushStatements,
    ClaimStatements,
    FlowStatements,
    StartStatements,
    AttemptStatements,
    BatchStatements,
    ScheduleStatements,
    AdminStatements,
    ListenStatements,
    WorkerStatements,
    BrowseStatements,
    StoreBase,
):
    """Named statements over the outbox tables (``{prefix}commands``, batches, schedules, pauses, workers)."""


__all__ = [
    "COPY_CHUNK_ROWS",
    "COPY_MIN_ROWS",
    "PENDING",
    "SORTS",
    "Dispatch",
    "ErrorInfo",
    "Lapsed",
    "LimitState",
    "Row",
    "Search",
    "Started",
    "Store",
    "job_key",
    "make_engine",
]
