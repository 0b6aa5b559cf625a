"""The monitor: the live workers of the registry, with what each runs now (OrchestratR's server monitor)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import WorkerNotFound
from .models import Page, RunningAttempt, WorkerInfo
from .validation import _check_page

if TYPE_CHECKING:
    from .store import Store


class Monitor:
    """Reads the registry and the attempts each worker runs."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def workers(self, limit: int | None = None, offset: int = 0) -> Page[WorkerInfo]:
        """Registered workers by nodename, with their running attempts; ``limit=None``: all of them."""
        if limit is not None:
            _check_page(limit, offset)
        rows, total = self.store.list_workers(limit, offset)
        return Page(self._with_running(rows), total, limit, offset)

    def worker(self, name: str) -> WorkerInfo:
        """One worker, by nodename; raises :class:`WorkerNotFound`."""
        row = self.store.get_worker(name)
        if row is None:
            raise WorkerNotFound(f"no worker named {name!r} is registered")
        return self._with_running([row])[0]

    def _with_running(self, rows: list[dict[str, Any]]) -> list[WorkerInfo]:
        running: dict[str, list[RunningAttempt]] = {}
        for r in self.store.running_on([row["name"] for row in rows]):
            key = r.get("unique_key") or ""
            name = key.split(":", 1)[1] if r.get("kind") == "job" and key.startswith("job:") else r["name"]
            running.setdefault(r["worker"], []).append(
                RunningAttempt(r["id"], name, r.get("kind") or "command", r["status"], r["attempt"], r["started_at"])
            )
        return [WorkerInfo(**row, running=running.get(row["name"], [])) for row in rows]
