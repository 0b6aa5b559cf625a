"""Where the CPU goes: user + system time per process group over a timed window, from ``/proc``.

A :class:`CpuMeter` reads every process's ``/proc/<pid>/stat`` before and after a run and
charges each one's CPU to a group: the trees of the subprocesses it was given (a worker and
its pool children, a relay), the PostgreSQL server, the broker (RabbitMQ's Erlang VM or
Redis), and this benchmark process (the pusher, or Celery's ``apply_async`` loop). A process
that ended inside the window loses what it used; the workers and relays measured here live
through it.

A group given as a subprocess is also split: ``<group> (main process)`` (the subprocess
itself: a worker's consumer, and its handler threads on a threads pool) and ``<group> (pool
processes)`` (its descendants: a prefork worker's children); the main process further into
``<group> (main thread)`` (a worker's consumer: receiving, handing to the pool,
acknowledging) and ``<group> (other threads)`` (on a threads pool, its handler threads and
the outbox's own). Those parts are not added to the ``total`` again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CLOCK = os.sysconf("SC_CLK_TCK")
#: Opens the name of a group's part (``worker (pool processes)``).
PART = " ("
#: Process names (``comm``) of each server group.
SERVERS = {"postgres": ("postgres",), "rabbitmq": ("beam.smp", "erl_child_setup"), "redis": ("redis-server",)}


@dataclass(frozen=True)
class Stat:
    ppid: int
    comm: str
    ticks: int  # utime + stime of the process and its threads


def snapshot() -> dict[int, Stat]:
    """Every process's parent, name and CPU ticks so far."""
    stats: dict[int, Stat] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        head, _, tail = text.rpartition(")")
        comm = head.split("(", 1)[1]
        stats[int(entry)] = Stat(int(tail.split()[1]), comm, _ticks(tail))
    return stats


def _ticks(tail: str) -> int:
    """utime + stime from the fields of a ``stat`` file after the name's closing parenthesis."""
    fields = tail.split()
    return int(fields[11]) + int(fields[12])


def main_thread_ticks(pid: int) -> int:
    """CPU ticks so far of a process's main thread alone (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return 0
    return _ticks(text.rpartition(")")[2])


def _tree(stats: Mapping[int, Stat], root: int) -> set[int]:
    members, grew = {root}, True
    while grew:
        more = {pid for pid, s in stats.items() if s.ppid in members} - members
        members |= more
        grew = bool(more)
    return members


class CpuMeter:
    """CPU seconds per group between :meth:`start` and :meth:`stop`."""

    def __init__(self, roots: Mapping[str, int]) -> None:
        """``roots``: group name → the pid of a subprocess whose whole tree is that group."""
        self.roots = dict(roots)
        self._before: dict[int, Stat] = {}
        self._threads: dict[int, int] = {}

    def start(self) -> None:
        self._threads = {root: main_thread_ticks(root) for root in self.roots.values()}
        self._before = snapshot()

    def stop(self) -> dict[str, float]:
        after = snapshot()
        threads = {root: main_thread_ticks(root) - ticks for root, ticks in self._threads.items()}
        own = os.getpid()
        groups: dict[int, str] = {own: "bench"}
        for name, root in self.roots.items():
            for pid in _tree(after, root) | _tree(self._before, root):
                groups[pid] = name
        for pid, stat in after.items():
            for name, comms in SERVERS.items():
                if pid not in groups and stat.comm in comms:
                    groups[pid] = name
        spent: dict[str, float] = {}
        roots = {root: name for name, root in self.roots.items()}
        for pid, name in groups.items():
            if pid not in after:
                continue
            used = (after[pid].ticks - (self._before[pid].ticks if pid in self._before else 0)) / CLOCK
            spent[name] = spent.get(name, 0.0) + used
            if name in self.roots:
                part = f"{name}{PART}{'main process' if roots.get(pid) == name else 'pool processes'})"
                spent[part] = spent.get(part, 0.0) + used
        for name, root in self.roots.items():
            if root in after and root in self._before:
                main = threads[root] / CLOCK
                spent[f"{name}{PART}main thread)"] = main
                spent[f"{name}{PART}other threads)"] = spent.get(f"{name}{PART}main process)", 0.0) - main
        return spent


def per_command_ms(seconds: Mapping[str, float], n: int) -> dict[str, float]:
    """Milliseconds of CPU per command of each group, and their ``total``."""
    out = {name: s * 1000 / n for name, s in seconds.items()}
    out["total"] = sum(v for name, v in out.items() if PART not in name)
    return out


def busy_note() -> str | None:
    """A warning when the machine is not quiet: figures taken beside other load are not comparable."""
    load1 = float(Path("/proc/loadavg").read_text().split()[0])
    others = []
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = status.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ("celery" in cmd or "pytest" in cmd) and "bench" not in cmd:
            others.append(cmd.split(" -", 1)[0][-40:])
    if load1 < 0.7 and not others:
        return None
    return (
        f"the machine is not quiet (load {load1:.2f}, {len(others)} other celery/pytest processes): figures will vary"
    )
