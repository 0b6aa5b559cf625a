"""Real processes of the e2e, fault and soak runs: spawned, watched, read and stopped.

A :class:`Proc` is a long-running subprocess (``celery worker``, ``celery beat``, Flower)
started by :func:`spawn` in its own process group (``start_new_session``) with its output
in a log file; stopping it ends with SIGKILL of the whole group, so that prefork pool
processes never outlive a test. Every wait on a process is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .waiting import wait_until

#: How long a stopped process gets for its warm shutdown (and a killed one to be reaped).
STOP_GRACE = 10.0
#: The default longest wait for a process to exit by itself (:meth:`Proc.wait_exit`).
EXIT_WAIT = 40.0
#: How much of the head of a log :meth:`Proc.log_has` reads by default (start-up lines; logs grow large).
LOG_HEAD = 512 * 1024
#: Prefixes of the variables :func:`clean_env` drops: no ambient Celery / outbox settings leak in.
AMBIENT = ("CELERY_", "ORCH_OUTBOX_")
#: Prefixes kept anyway by default: the test suite's own server addresses (``ORCH_OUTBOX_TEST_PG_URL``).
TEST_SETTINGS = ("ORCH_OUTBOX_TEST_",)


# -- commands --------------------------------------------------------------------------------


def python() -> str:
    """The interpreter of the virtualenv the tests run in."""
    return sys.executable


def orch_outbox_cli() -> list[str]:
    """The ``orch-outbox`` console script installed next to the interpreter."""
    script = Path(sys.executable).with_name("orch-outbox")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "orch_outbox.cli"]


def celery_argv(*args: str) -> list[str]:
    """``python -m celery -A orch_outbox ARGS``: the ready app, configured from ``celeryconfig``."""
    return [python(), "-m", "celery", "-A", "orch_outbox", *args]


def worker_argv(queue: str, node: str, pool: str = "threads", concurrency: int = 2) -> list[str]:
    """A worker on the command queue only, named ``<node>@%h``, without mingle and gossip."""
    return celery_argv(
        "worker",
        "-Q",
        queue,
        "--pool",
        pool,
        "-c",
        str(concurrency),
        "--without-mingle",
        "--without-gossip",
        "-n",
        f"{node}@%h",
        "--loglevel",
        "INFO",
    )


def beat_argv(*extra: str) -> list[str]:
    """``celery -A orch_outbox beat``: the relay and the rescuer, in-process."""
    return celery_argv("beat", "--loglevel", "INFO", *extra)


def clean_env(extra: Mapping[str, str] | None = None, keep: tuple[str, ...] = TEST_SETTINGS) -> dict[str, str]:
    """The environment of a subprocess: no ambient Celery / outbox settings (but those starting with one
    of ``keep``), no PYTHONPATH, unbuffered output; then ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(AMBIENT) or key.startswith(keep)}
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)
    env.update(extra or {})
    return env


# -- long-running processes ----------------------------------------------------------------


@dataclass
class Proc:
    """A long-running subprocess in its own process group, its output in a log file."""

    role: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes]
    #: A name of the caller's (the soak names workers by their Celery node).
    node: str = ""
    #: False once it is stopped or killed on purpose (waits stop watching it).
    expect_alive: bool = True
    #: The log line that says it is ready (None: nothing to wait for).
    ready_text: str | None = None
    started: float = field(default_factory=time.monotonic)
    _ready: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    # -- the log ------------------------------------------------------------------------

    def output(self) -> str:
        """The whole log so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count(self, text: str) -> int:
        return self.output().count(text)

    def lines(self, *needles: str) -> list[str]:
        """The lines of the log that contain every needle."""
        return [line for line in self.output().splitlines() if all(n in line for n in needles)]

    def iter_lines(self) -> Iterator[str]:
        """The lines of the log, read as a stream (for logs too large to read at once)."""
        with contextlib.suppress(FileNotFoundError), self.log.open(errors="replace") as handle:
            yield from handle

    def log_has(self, text: str, limit: int | None = LOG_HEAD) -> bool:
        """Whether the head of the log (``limit`` bytes; None: all of it) holds ``text``."""
        try:
            with self.log.open("rb") as handle:
                return text.encode() in handle.read(-1 if limit is None else limit)
        except FileNotFoundError:
            return False

    def ready(self) -> bool:
        """Whether its log shows :attr:`ready_text` (remembered once seen; True without one)."""
        if not self._ready:
            self._ready = self.ready_text is None or self.log_has(self.ready_text, limit=None)
        return self._ready

    def describe(self) -> str:
        return f"{self.role} pid={self.pid} exit={self.popen.poll()} ({' '.join(self.argv)})"

    # -- signals ------------------------------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM to the main process: Celery's warm shutdown."""
        self.expect_alive = False
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)

    def kill(self, reap: float = STOP_GRACE) -> None:
        """kill -9 of the whole process group (the main process and its pool children), then reap it."""
        self.expect_alive = False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=reap)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM (warm shutdown), then SIGKILL of the whole process group after a bounded wait."""
        if self.alive():
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        # Whatever is left of the group (prefork children, a hung main process) is killed.
        self.kill(grace)

    def wait_exit(self, timeout: float = EXIT_WAIT) -> int:
        """The exit code; raises subprocess.TimeoutExpired if it is still running after ``timeout``."""
        return self.popen.wait(timeout=timeout)

    def children(self) -> list[int]:
        """Pids of its child processes (a prefork worker's pool processes)."""
        return children_of(self.pid)


def spawn(
    role: str,
    argv: list[str],
    cwd: Path,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_text: str | None = None,
    node: str = "",
) -> Proc:
    """Start ``argv`` in ``cwd``, in a process group of its own, stdout and stderr into ``log``.

    ``env`` is the whole environment of the process (default: :func:`clean_env`).
    """
    with log.open("wb") as handle:
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else clean_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: one killpg takes the pool processes too
        )
    return Proc(role, argv, log, popen, node=node, ready_text=ready_text)


def stop_all(procs: Iterable[Proc], grace: float = STOP_GRACE) -> None:
    """SIGTERM every live process at once, one bounded wait for all, then SIGKILL of every process group."""
    procs = list(procs)
    for proc in procs:
        if proc.alive():
            proc.terminate()
    until = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=max(0.1, until - time.monotonic()))
    for proc in procs:
        proc.kill(grace)  # pool processes left behind by a main process that exited, or a hung one


def check_alive(procs: Iterable[Proc], what: str, report: Callable[[], str] | None = None) -> None:
    """Raise AssertionError if a process expected to run has exited (while waiting for ``what``)."""
    dead = [p for p in procs if p.expect_alive and not p.alive()]
    if dead:
        raise AssertionError(
            f"{', '.join(p.role for p in dead)} exited ({[p.popen.returncode for p in dead]}) "
            f"while waiting for {what}{report() if report else ''}"
        )


def wait_ready(
    procs: Iterable[Proc], timeout: float, what: str, interval: float = 0.1, report: Callable[[], str] | None = None
) -> None:
    """Wait until every process shows its ready line; fails at once if one of them exits meanwhile."""
    starting = list(procs)

    def ready() -> bool:
        check_alive(starting, what, report)
        return all(p.ready() for p in starting)

    wait_until(ready, timeout, interval, lambda: f"{what}{report() if report else ''}")


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (a prefork worker's pool processes), from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the process exited while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


# -- one-shot commands ---------------------------------------------------------------------


def run_command(
    argv: list[str],
    cwd: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
    transcripts: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion in ``cwd`` (``env``: the whole environment, default :func:`clean_env`),
    its output captured; a transcript of the call is appended to ``transcripts``. A timeout raises
    subprocess.TimeoutExpired (its transcript says TIMED OUT); a non-zero exit is the caller's to judge."""
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        if transcripts is not None:
            transcripts.append(
                f"$ {' '.join(argv)}\nTIMED OUT after {timeout}s\n{_text(exc.stdout)}{_text(exc.stderr)}"
            )
        raise
    if transcripts is not None:
        transcripts.append(f"$ {' '.join(argv)}\n[exit {done.returncode}]\n{done.stdout}{done.stderr}")
    return done


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def json_line(text: str) -> Any:
    """The JSON document on the last line of a script's output."""
    return json.loads(text.strip().splitlines()[-1])


# -- small helpers -------------------------------------------------------------------------


def tail(text: str, lines: int = 120) -> str:
    """The last ``lines`` lines of ``text``."""
    parts = text.splitlines()
    return "\n".join(parts[-lines:]) if len(parts) > lines else text


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
