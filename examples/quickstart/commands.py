"""The quick start's commands, declared on the ready app (``celery -A orch_outbox worker`` imports this module)."""

from __future__ import annotations

from typing import Any

from orch_outbox import Outcome, command


@command
def greet(name: str) -> str:
    """Say hello."""
    return f"hello {name}"


@command
def shout(text: str) -> str:
    """Say it louder: chained from every greeting that completed."""
    return f"{text.upper()}!"


@greet.then
def _shout_the_greeting(outcome: Outcome) -> list[Any]:
    # Inserted in the same transaction that records greet as completed, with parent_id set.
    return [shout.s(outcome.output)]
