"""Fixtures of the fault-injection scenarios: projects, proxies, and a teardown that leaves nothing running."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from .harness import FaultProject
from conftest import AMQP_URL, PG_URL, REDIS_URL, require
from support.proxy import Proxy

#: Redis database of the fault scenarios (other suites use other databases on the shared server).
REDIS_FAULTS_URL = REDIS_URL.rsplit("/", 1)[0] + "/12"
BROKERS = {"rabbitmq": AMQP_URL, "redis": REDIS_FAULTS_URL}


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url.replace("postgresql+psycopg", "postgresql"))
    return parts.hostname or "127.0.0.1", parts.port or default_port


PG_HOST, PG_PORT = _host_port(PG_URL, 5432)


class Lab:
    """Builds projects and proxies for one test; :meth:`close` stops processes first, then proxies."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.projects: list[FaultProject] = []
        self.proxies: list[Proxy] = []

    def project(self, broker: str = "rabbitmq", **config: Any) -> FaultProject:
        """A fault project on ``broker`` (``rabbitmq`` or ``redis``) with extra celeryconfig settings."""
        url = BROKERS[broker]
        require(*_host_port(url, 5672 if broker == "rabbitmq" else 6379), broker)
        require(PG_HOST, PG_PORT, "PostgreSQL")
        root = self.tmp_path / f"project-{len(self.projects)}"
        root.mkdir()
        project = FaultProject.create(root, url, PG_URL, **config)
        self.projects.append(project)
        return project

    def proxy(self, what: str) -> Proxy:
        """A proxy in front of ``postgres``, ``rabbitmq`` or ``redis``."""
        if what == "postgres":
            host, port = PG_HOST, PG_PORT
        else:
            host, port = _host_port(BROKERS[what], 5672 if what == "rabbitmq" else 6379)
        proxy = Proxy(host, port, name=f"{what}-proxy")
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        errors: list[BaseException] = []
        for project in self.projects:
            try:
                project.close()
            except Exception as exc:  # close every project, then report
                errors.append(exc)
        for proxy in self.proxies:
            proxy.close()
        if errors:
            raise errors[0]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """Projects and proxies of one scenario; every process group is killed at teardown."""
    built = Lab(tmp_path)
    try:
        yield built
    finally:
        built.close()
