"""This process's id, kept current across forks, read without a system call.

The worker's per-command paths check whether a connection or a thread belongs to this
process (a forked pool child must not use its parent's); ``os.getpid()`` is a system call
each time, and a few of them per command show on a busy worker.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current() -> int:
    """This process's id."""
    return _pid
