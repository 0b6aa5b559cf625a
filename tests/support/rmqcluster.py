"""A RabbitMQ cluster of three nodes on loopback, from Debian's package, for the ``ha`` tests.

Each node has its own name (``haN-<token>@localhost``), AMQP and distribution ports, data and
log folders under /tmp, and a configuration file of its own (the machine's RabbitMQ keeps its
port); they share the machine's Erlang cookie, so the second and third join the first.
``url`` lists the three for Celery's and kombu's failover (``amqp://...;amqp://...``).
``kill(i)`` is a kill -9 of that node's Erlang VM. ``stop()`` ends every node and removes its
folders.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .procs import free_port


def available() -> bool:
    return shutil.which("rabbitmq-server") is not None and shutil.which("rabbitmqctl") is not None


@dataclass
class Node:
    name: str
    port: int
    dist_port: int
    root: Path

    @property
    def pidfile(self) -> Path:
        return self.root / "pid"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "plugins"),
            "RABBITMQ_PID_FILE": str(self.pidfile),
        }

    def start(self) -> None:
        self.root.mkdir(parents=True)
        os.chmod(self.root, 0o777)
        conf = self.root / "rabbitmq.conf"
        conf.write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n")
        os.chmod(conf, 0o644)
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env(), cwd="/tmp", check=True, timeout=60)
        self.ctl("wait", str(self.pidfile), "--timeout", "90", timeout=120)

    def ctl(self, *args: str, timeout: float = 90) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args], capture_output=True, text=True, timeout=timeout, cwd="/tmp"
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.name}: {done.stdout}\n{done.stderr}")
        return done.stdout

    def os_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pidfile.read_text().strip())
        return None

    def kill(self) -> None:
        pid = self.os_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"


@dataclass
class Cluster:
    nodes: list[Node]
    root: Path

    @classmethod
    def start(cls, size: int = 3) -> Cluster:
        root = Path(tempfile.mkdtemp(prefix="orch-rmq-"))
        os.chmod(root, 0o777)
        token = uuid.uuid4().hex[:6]
        nodes = [Node(f"ha{i}-{token}@localhost", free_port(), free_port(), root / f"n{i}") for i in range(size)]
        cluster = cls(nodes, root)
        try:
            with ThreadPoolExecutor(size) as pool:
                list(pool.map(Node.start, nodes))
            for node in nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", nodes[0].name)
                node.ctl("start_app")
            nodes[0].ctl("await_online_nodes", str(size), "--timeout", "60")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def url(self) -> str:
        return ";".join(node.url for node in self.nodes)

    def queue_members(self, queue: str, on: int = 1) -> str:
        return self.nodes[on].ctl("list_queues", "name", "type", "leader", "members", "-q")

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.ctl("stop", timeout=30)
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)
