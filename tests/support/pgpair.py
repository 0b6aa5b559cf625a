"""A PostgreSQL primary and a streaming standby on loopback ports, from Debian's own binaries, for the ``ha`` tests.

``PgPair.start(synchronous=True)`` runs ``initdb`` (as the ``postgres`` user when
run as root), starts the primary on a free port, takes a ``pg_basebackup -R`` into the
standby's folder and starts it on another free port; with ``synchronous`` the primary
waits for the standby to confirm every commit (``synchronous_standby_names = '*'``,
``synchronous_commit = on``). ``kill_primary()`` is a kill -9 of the primary's
postmaster (and so of its backends); ``promote()`` makes the standby the primary.
``url`` is a libpq multi-host URL with ``target_session_attrs=read-write``: a new
connection goes to whichever of the two accepts writes. ``stop()`` ends both.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import free_port

BIN = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]) if glob.glob("/usr/lib/postgresql/*/bin") else None
AS_POSTGRES = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def available() -> bool:
    return BIN is not None and (not AS_POSTGRES or shutil.which("runuser") is not None)


def _run(*argv: str, timeout: float = 120) -> str:
    assert BIN is not None
    done = subprocess.run([*AS_POSTGRES, *argv], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    return done.stdout


@dataclass
class Server:
    data: Path
    port: int
    log: Path

    def start(self) -> None:
        assert BIN is not None
        _run(str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        assert BIN is not None
        with contextlib.suppress(Exception):
            _run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def sql(self, statement: str) -> str:
        assert BIN is not None
        return _run(str(BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                    "-Atc", statement)  # fmt: skip


@dataclass
class PgPair:
    root: Path
    primary: Server
    standby: Server
    synchronous: bool
    promoted: bool = field(default=False)

    @classmethod
    def start(cls, synchronous: bool = True) -> PgPair:
        """Both servers, in a folder of their own under /tmp (the ``postgres`` user must reach it)."""
        assert BIN is not None, "no PostgreSQL binaries under /usr/lib/postgresql"
        root = Path(tempfile.mkdtemp(prefix="orch-ha-"))
        os.chmod(root, 0o777)
        primary = Server(root / "primary", free_port(), root / "primary.log")
        standby = Server(root / "standby", free_port(), root / "standby.log")
        for log in (primary.log, standby.log):
            log.touch()
            os.chmod(log, 0o666)
        _run(str(BIN / "initdb"), "-D", str(primary.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        conf = [
            f"port = {primary.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{root}'",
            "wal_level = replica",
            "max_wal_senders = 5",
            "hot_standby = on",
            "max_connections = 200",
            "shared_buffers = 64MB",
        ]
        with open(primary.data / "postgresql.conf", "a") as f:
            f.write("\n".join(conf) + "\n")
        with open(primary.data / "pg_hba.conf", "a") as f:
            f.write("host replication all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 trust\n")
        primary.start()
        primary.sql("CREATE DATABASE test")
        _run(
            str(BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast", "--no-sync",
        )  # fmt: skip
        with open(standby.data / "postgresql.conf", "a") as f:
            f.write(f"port = {standby.port}\n")
        standby.start()
        pair = cls(root, primary, standby, synchronous)
        pair.wait_streaming()
        if synchronous:  # only now: with no standby yet, every commit would wait for one
            primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
            primary.sql("SELECT pg_reload_conf()")
            pair.wait_sync()
        return pair

    def wait_sync(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.primary.sql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'").strip() == "1":
                return
            time.sleep(0.1)
        raise TimeoutError("the standby did not become synchronous")

    def wait_streaming(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.primary.sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").strip() == "1":
                return
            time.sleep(0.2)
        raise TimeoutError("the standby did not start streaming")

    @property
    def url(self) -> str:
        """Both servers, the writable one chosen at each new connection."""
        hosts = f"host=127.0.0.1:{self.primary.port}&host=127.0.0.1:{self.standby.port}"
        return f"postgresql+psycopg://postgres@/test?{hosts}&target_session_attrs=read-write&connect_timeout=3"

    @property
    def standby_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.standby.port}/test"

    @property
    def primary_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.primary.port}/test"

    def kill_primary(self) -> None:
        pid = self.primary.postmaster_pid()
        assert pid is not None, "the primary is not running"
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            subprocess.run(["pkill", "-9", "-f", f"{self.primary.data}"], timeout=10, check=False)

    def promote(self) -> None:
        assert BIN is not None
        _run(str(BIN / "pg_ctl"), "-D", str(self.standby.data), "-w", "-t", "60", "promote")
        self.promoted = True

    def stop(self) -> None:
        for server in (self.standby, self.primary):
            server.stop()
        shutil.rmtree(self.root, ignore_errors=True)
