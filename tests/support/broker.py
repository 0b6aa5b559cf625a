"""The broker side of a run: how deep a queue is, and deleting a run's queue afterwards."""

from __future__ import annotations

import contextlib

#: Seconds to connect to the broker.
CONNECT_TIMEOUT = 5


def queue_depth(url: str, queue: str, missing_ok: bool = True) -> int:
    """Messages waiting in ``queue`` (stale ones included). A queue that does not exist counts 0 with
    ``missing_ok``; without it, the broker's channel error propagates (as does any other error)."""
    from kombu import Connection  # type: ignore[attr-defined]

    with Connection(url, connect_timeout=CONNECT_TIMEOUT) as conn:  # type: ignore[no-untyped-call]
        try:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
        except conn.channel_errors:
            if missing_ok:
                return 0
            raise


def delete_queue(url: str, queue: str, quiet: bool = True) -> None:
    """Remove a run's queue from a shared broker; ``quiet``: best effort, errors ignored."""
    from kombu import Connection, Queue  # type: ignore[attr-defined]

    with contextlib.ExitStack() as stack:
        if quiet:
            stack.enter_context(contextlib.suppress(Exception))
        conn = stack.enter_context(Connection(url, connect_timeout=CONNECT_TIMEOUT))  # type: ignore[no-untyped-call]
        Queue(queue).bind(conn.default_channel).delete()  # type: ignore[no-untyped-call]
