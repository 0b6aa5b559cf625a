"""What the outbox calls for a plain Celery task: worked out once per task, and again when its ``run`` changes."""

from __future__ import annotations

from celery import Celery

from orch_outbox.task import adopt, handler_of


def test_a_plain_tasks_handler_is_kept_and_follows_its_run() -> None:
    """Proves a plain task's signature is worked out once (every push and every attempt reuses it) and that a
    task whose ``run`` is replaced afterwards (the outbox adopting it, a user's wrapper) is called through the new
    ``run`` with its own signature, never through a stale one."""
    app = Celery("handler-of", set_as_current=False)

    @app.task(name="h_plain", shared=False)
    def plain(to: str, n: int = 1) -> str:
        return to * n

    task = app.tasks["h_plain"]
    first = handler_of(task)
    assert handler_of(task) is first
    assert list(first.signature.parameters) == ["to", "n"] and first.hints["n"] is int

    def other(subject: str) -> str:
        return subject

    task.run = other
    moved = handler_of(task)
    assert moved.run is other and list(moved.signature.parameters) == ["subject"]
    assert adopt(task, lambda _task, _request: None)  # the outbox wraps run and keeps the task's own
    assert handler_of(task).run is other
