"""Signals the outbox sends (Celery's dispatcher, so receivers connect as to Celery's own).

``command_failed``: every attempt that did not succeed (a failure, timeout, lost lease or
unknown name), whether it will be retried (``failure.final`` False) or the command is now
failed (True). Sent by the worker that ran the attempt, or by the rescuer for a lost
one. ``sender`` is the :class:`~orch_outbox.Outbox`; ``failure`` a ``FailedAttempt``.
A receiver that raises is logged and does not change the outcome::

    from orch_outbox.signals import command_failed

    @command_failed.connect
    def to_sentry(sender, failure, **_):
        sentry_sdk.capture_message(f"{failure.name} failed: {failure.error.message}")
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

command_failed = Signal(name="command_failed", providing_args={"failure"})

__all__ = ["command_failed"]
