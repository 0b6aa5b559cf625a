"""A beat scheduler that runs the outbox's own services inside the beat process.

The relay, the lease rescuer, the cron schedules and the retention clean-up are ordinary
beat entries, but sending them as messages would need a worker consuming some extra
queue. This scheduler runs those entries in-process instead, so ``celery -A orch_outbox
beat`` plus a worker on the commands' queues is all a deployment needs. Every other entry is sent as usual.

On PostgreSQL it also starts the listening relay, which relays within milliseconds of a
push's commit; while that relay is listening, the polling relay and rescuer entries stand aside.

Use it with ``beat_scheduler = "orch_outbox.beat:Scheduler"`` (the ready app sets it).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.beat import PersistentScheduler, ScheduleEntry

from .listener import ListeningRelay
from .registry import outbox_of
from .wiring import LOCAL_TASKS, RELAY_TASK, RESCUE_TASK

log = logging.getLogger("orch_outbox.beat")

#: The service entries the listening relay runs itself while it listens (schedules and clean-up always run here).
LISTENER_TASKS = frozenset({RELAY_TASK, RESCUE_TASK})


class Scheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler, running the outbox's service entries in-process."""

    listener: ListeningRelay | None = None

    def setup_schedule(self) -> None:
        super().setup_schedule()
        outbox = outbox_of(self.app)
        if outbox.store.can_listen and self.listener is None:
            self.listener = outbox.listening_relay()
            self.listener.start()
            log.info("listening relay started on channel %scommands", outbox.settings.table_prefix)

    def apply_async(self, entry: ScheduleEntry, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        if entry.task not in LOCAL_TASKS:
            return super().apply_async(entry, producer, advance, **kwargs)
        entry = self.reserve(entry) if advance else entry
        if entry.task in LISTENER_TASKS and self.listener is not None and self.listener.listening.is_set():
            return None  # the listening relay is doing this work
        task = self.app.tasks[entry.task]
        result = task.apply(entry.args, entry.kwargs)
        if result.failed():
            log.error("%s failed: %r", entry.task, result.result)
        return result

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        super().close()
