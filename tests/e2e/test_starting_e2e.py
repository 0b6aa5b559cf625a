"""``outbox_start_in_consumer`` with real ``celery worker`` processes (prefork), as users run them.

The worker's main process claims the attempts of the messages it receives for its pool.
A warm shutdown must give back the claims of the messages no pool process took: the
broker redelivers those messages and the next worker starts them at once, as the first
attempt, instead of waiting for their leases to lapse and the rescuer to make second ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Project, python
from .test_flow_e2e import configure, make
from conftest import AMQP_URL
from support.procs import beat_argv

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    made = make(tmp_path, AMQP_URL, "rabbitmq")
    yield made
    made.close()


def test_warm_shutdown_gives_back_what_the_pool_never_took(project: Project) -> None:
    """Proves the hand-back: a prefork -c1 worker (prefetch 4) claims the slow commands it receives; after its warm
    shutdown no command is left `running` (the untaken ones are `dispatched` again, attempt 1), and a second
    worker completes all 12, every one in its first attempt (no lease lapsed, no rescue). Also proves the claims
    were made by the main process: the workers' log says how many it gave back."""
    configure(project, outbox_start_in_consumer=True, worker_prefetch_multiplier=4)
    project.migrate()
    project.spawn("beat", beat_argv())
    script = (
        "import e2e_commands\n"
        "from orch_outbox import default_outbox\n"
        "outbox = default_outbox()\n"
        "with outbox.engine.begin() as conn:\n"
        "    outbox.push_many(conn, [e2e_commands.slow.s(0.4)] * 12)\n"
    )
    project.run([python(), "-c", script])
    first = project.start_worker(pool="prefork", concurrency=1)
    store = project.store
    project.wait_for(lambda: store.count(status="completed") >= 1, "a first command to complete")
    first.terminate()  # warm shutdown: the running handler finishes, the prefetched messages go back
    project.wait_for(lambda: not first.alive(), "the first worker to exit", procs=[])
    assert store.count(status="running") == 0, project.report()
    given_back = first.lines("returned", "claimed attempt(s)")
    assert given_back, project.report()
    second = project.start_worker(pool="prefork", concurrency=1)
    project.wait_for(lambda: store.count(status="completed") == 12, "all 12 commands to complete", procs=[second])
    rows = store.find(limit=12)
    assert sorted(r["attempt"] for r in rows) == [1] * 12, [(r["status"], r["attempt"]) for r in rows]
