"""The Django integration end to end: the example project (examples/django) against real workers.

The project is set up in this process on a scratch PostgreSQL database (``support.django_site``); a
real ``celery -A proj worker`` and ``celery -A proj beat`` run it in subprocesses, with the example
on PYTHONPATH and DJANGO_SETTINGS_MODULE set, on a RabbitMQ queue of the run's own. The pushes are
made by the project's own code (``shop.views.place_order``), by a script on each of Django's two
PostgreSQL drivers, and by ``manage.py``; what they left is read back on the outbox's own engine.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import AMQP_URL
from e2e.test_examples import run_documented
from support.broker import delete_queue
from support.django_site import (
    EXAMPLE,
    WEB_URL,
    Site,
    create_database,
    django_site,
    drop_database,
    project_env,
    url_of,
)
from support.procs import (
    Proc,
    beat_argv,
    check_alive,
    clean_env,
    json_line,
    python,
    run_command,
    spawn,
    stop_all,
    tail,
    wait_ready,
    worker_argv,
)
from support.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
__all__ = ["django_site"]  # the fixture, imported

#: The longest wait for a command to be final, or for the worker and beat to be ready.
WAIT = 60.0
CHECK = Path(__file__).resolve().parents[1] / "support" / "django_driver_check.py"


@pytest.fixture(scope="module")
def services(django_site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    """``celery -A proj worker -Q <the site's queue>`` and ``celery -A proj beat`` on the site's database."""
    logs = tmp_path_factory.mktemp("django-services")
    procs: list[Proc] = []
    env = clean_env(django_site.env())
    try:
        for role, argv, ready in (
            ("worker", worker_argv(django_site.queue, "django"), " ready."),
            ("beat", beat_argv("-s", str(logs / "beat")), "listening relay started"),
        ):
            argv[argv.index("orch_outbox")] = "proj"  # `celery -A proj ...`: the project's own app
            procs.append(spawn(role, argv, logs, logs / f"{role}.log", env=env, ready_text=ready))
        wait_ready(procs, WAIT, "the worker and beat to start", report=lambda: _logs(procs))
        yield procs
    finally:
        stop_all(procs)


def _logs(procs: list[Proc]) -> str:
    return "".join(f"\n--- {p.describe()} ---\n{tail(p.output(), 60)}" for p in procs)


def final(site: Site, procs: list[Proc], command_id: Any) -> Any:
    """The command once it is final (waited on, bounded), read on the outbox's own engine."""

    def done() -> Any:
        check_alive(procs, f"command {command_id}", lambda: _logs(procs))
        info = site.outbox.get(command_id)
        return info if info.status in ("completed", "failed", "canceled", "expired") else None

    return wait_until(done, WAIT, 0.1, lambda: f"command {command_id} to be final{_logs(procs)}")


def command_ids(url: str) -> set[str]:
    """Every command id in a database's outbox table, read on a connection of the test's own."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {str(i) for i in conn.execute(sa.text("SELECT id FROM orch_commands")).scalars()}
    finally:
        engine.dispose()


def test_place_order_commits_and_a_real_worker_completes_it(django_site: Site, services: list[Proc]) -> None:
    """Proves (b) with the project's own code in this process: ``place_order`` saves an Order and pushes
    ``confirm_order`` in one ``transaction.atomic()`` on Django's psycopg 3 connection; once the block commits,
    the real worker runs the command, which completes with its output and has confirmed the order through the
    ORM. And (a): the order over the stock raises inside its block after its push; neither the order nor its
    command exists, and the worker never saw it (its log names only the committed command)."""
    item = f"book-{uuid.uuid4().hex[:6]}"
    before = command_ids(django_site.url)
    order, command_id = django_site.views.place_order(item, 2)
    with pytest.raises(django_site.views.OutOfStock):
        django_site.views.place_order(f"{item}-too-many", django_site.views.STOCK + 1)
    info = final(django_site, services, command_id)
    assert info.status == "completed", info
    assert info.output == f"order {order.pk}: 2 x {item} confirmed"
    assert django_site.order.objects.get(pk=order.pk).status == "confirmed"
    assert not django_site.order.objects.filter(item=f"{item}-too-many").exists()
    assert command_ids(django_site.url) - before == {str(command_id)}
    received = {line.split("[")[-1].split("]")[0] for line in services[0].lines("Task confirm_order[", "received")}
    assert str(command_id) in received and received <= command_ids(django_site.url)  # no task of a rolled-back push
    assert services[0].count(f"Task confirm_order[{command_id}] succeeded") == 1


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_each_driver_rolls_back_commits_and_autocommits(django_site: Site, services: list[Proc], driver: str) -> None:
    """Proves (a), (b), (c) and (d) on each of Django's PostgreSQL drivers (psycopg 3, and psycopg2 with psycopg
    hidden from Django's backend; see support/django_driver_check.py), in a process of the project's own:
    a push inside ``atomic()`` is seen by Django's connection inside the block and by no other connection, and
    a rollback drops it; a committed one is seen elsewhere only after the commit; one outside ``atomic()`` is
    seen elsewhere as soon as the push returns. A unique key pushed twice is one command (its holder's jsonb read
    back on Django's connection). Django's connection is the same, open, in autocommit afterwards, without a
    notice handler added. Then the real worker completes both kept commands with their outputs, and
    the rolled-back one is not in the table (it never ran)."""
    done = run_command([python(), str(CHECK), driver], EXAMPLE, 120, clean_env(django_site.env()))
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json_line(done.stdout)
    assert seen["driver"] == driver
    assert (seen["rolled_back_seen_inside"], seen["rolled_back_seen_elsewhere"], seen["rolled_back_after"]) == (1, 0, 0)
    assert (seen["committed_seen_elsewhere_before_commit"], seen["committed_seen_elsewhere"]) == (0, 1)
    assert seen["autocommit_seen_elsewhere"] == 1 and seen["unique_key_kept"]
    assert seen["same_connection"] and seen["django_autocommit"]
    assert seen["handlers_after"] == seen["handlers_before"]
    for key, quantity, item in (("committed", 2, "committed"), ("autocommit", 3, "autocommit")):
        info = final(django_site, services, seen[key])
        assert info.status == "completed", info
        assert info.output == f"order {seen[f'{key}_order']}: {quantity} x {item} confirmed"
    assert seen["rolled_back"] not in command_ids(django_site.url)
    assert services[0].count(seen["rolled_back"]) == 0


def test_outbox_migrate_creates_the_tables(tmp_path: Path) -> None:
    """Proves (e): on a fresh database, ``manage.py outbox_migrate`` creates the outbox's tables (Alembic, at its
    head revision), in Django's ``DATABASES["default"]`` (no CELERY_OUTBOX_DATABASE_URL set), and says so; a
    second run changes nothing and succeeds."""
    name = create_database("django_migrate")
    try:
        engine = sa.create_engine(url_of(name))
        try:
            assert "orch_commands" not in sa.inspect(engine).get_table_names()
            env = clean_env({**project_env(name, "unused"), "PYTHONPATH": str(EXAMPLE)})
            for _ in range(2):
                done = run_command([python(), "manage.py", "outbox_migrate"], EXAMPLE, 120, env)
                assert done.returncode == 0, done.stdout + done.stderr
                assert f"at revision head (postgresql+psycopg://postgres@127.0.0.1:5432/{name})" in done.stdout
            tables = set(sa.inspect(engine).get_table_names())
            assert {"orch_commands", "orch_batches", "orch_alembic_version"} <= tables
            assert "shop_order" not in tables  # Django's own migrations are manage.py migrate's
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT version_num FROM orch_alembic_version")).scalar_one()
        finally:
            engine.dispose()
    finally:
        drop_database(name)


def test_admin_outbox_page_is_for_staff_only(django_site: Site) -> None:
    """Proves (f) with Django's test client: /admin/outbox/ sends an anonymous visitor and a logged-in user who is
    not staff to the admin's login page; for a staff user it renders the outbox's counts by target and status
    (a pending command pushed for the test is counted under its target) and links to the operator's page
    named by CELERY_OUTBOX_WEB_URL."""
    from django.contrib.auth.models import User
    from django.test import Client

    target = f"admin-{uuid.uuid4().hex[:6]}"
    order = django_site.order.objects.create(item="admin", quantity=1)
    django_site.tasks.confirm_order.options(target=target, delay=3600).push(order.pk)
    suffix = uuid.uuid4().hex[:6]
    staff = User.objects.create_user(f"staff-{suffix}", password="pw", is_staff=True)
    plain = User.objects.create_user(f"plain-{suffix}", password="pw")
    client = Client()
    anonymous = client.get("/admin/outbox/")
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/admin/login/")
    client.force_login(plain)
    refused = client.get("/admin/outbox/")
    assert refused.status_code == 302 and refused["Location"].startswith("/admin/login/")
    client.force_login(staff)
    page = client.get("/admin/outbox/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="outbox-targets"' in html and f"commands?target={target}" in html
    row = html[html.index(f">{target}</a>") :].split("</tr>")[0]
    assert [cell.split("<")[0] for cell in row.split("<td>")[1:]] == ["0", "1", "0", "0", "1"]
    assert f'href="{WEB_URL}/"' in html and f"/{django_site.database}</code>" in html


def test_django_example_runs_as_its_readme_says(tmp_path: Path) -> None:
    """Proves `python examples/django/run.py`, run as its README says with SHOP_DB_NAME, BROKER_URL and
    ORDERS_QUEUE in its environment, exits 0: the order placed in atomic() was confirmed by the worker and its
    command completed; the order over the stock left nothing. Read back from the database: one order,
    confirmed, and one confirm_order command, completed."""
    name = create_database("django_example")
    queue = f"django-example-{uuid.uuid4().hex[:8]}"
    try:
        output = run_documented("django", tmp_path, project_env(name, queue))
        assert "django: the order was confirmed" in output
        assert "refused: only 100" in output
        engine = sa.create_engine(url_of(name))
        try:
            with engine.connect() as conn:
                orders = conn.execute(sa.text("SELECT quantity, status FROM shop_order")).all()
                commands = conn.execute(sa.text("SELECT name, status FROM orch_commands")).all()
        finally:
            engine.dispose()
        assert [tuple(o) for o in orders] == [(2, "confirmed")]
        assert [tuple(c) for c in commands] == [("confirm_order", "completed")]
    finally:
        drop_database(name)
        delete_queue(AMQP_URL, queue)
