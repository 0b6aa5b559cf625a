"""Bad input, continued (see test_bad_input.py): hand-written rows, forged and foreign messages at the worker."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kombu import Exchange, Producer, Queue
from kombu.exceptions import ChannelError

from orch_outbox import (
    Outbox,
    UnknownCommand,
)
from orch_outbox.testing import drain, wait_for_status, wait_until
from orch_outbox.uuid7 import uuid7

from .helpers import (
    REDIS_DB11,
    TARGETS,
    WAIT,
    never,
    unique_target,
)
from conftest import make_app, require, run_worker, unique_prefix

# -- worker side: hand-written rows, forged and foreign messages ------------------------------------------


@pytest.fixture
def worker_outbox(pg_engine: sa.Engine) -> Iterator[Callable[..., Outbox]]:
    """``worker_outbox(broker=REDIS_DB11)``: an outbox on PostgreSQL with its own Celery app and table.

    Redis by default: an in-process worker on kombu's memory transport takes ~4 s to stop (its
    synchronous loop drains with a 2 s timeout), one on Redis a few milliseconds. Queue names are
    unique per test; their Redis keys are deleted afterwards.
    """
    made: list[Outbox] = []

    def make(broker: str = REDIS_DB11, **settings: Any) -> Outbox:
        if broker.startswith("redis"):
            require("127.0.0.1", 6379, "Redis")
        app = make_app(broker)
        app.conf.broker_transport_options = {"polling_interval": 0.02}  # the memory transport polls
        outbox = Outbox(
            app,
            pg_engine,
            table_prefix=unique_prefix(),
            lock_buffer=2.0,
            retry_backoff="fixed",
            retry_backoff_base=0.0,
            **settings,
        )
        outbox.create_tables()
        made.append(outbox)
        return outbox

    yield make
    for outbox in made:
        outbox.store.drop_all()
        outbox.close()
        if outbox.app.conf.broker_url.startswith("redis"):
            import redis

            client = redis.Redis.from_url(outbox.app.conf.broker_url)
            for target in TARGETS:
                client.delete(target, f"_kombu.binding.{target}", f"_kombu.binding_permanent.{target}")
            client.close()


def insert_row(outbox: Outbox, name: str, target: str, data: Any, *, retries: int = 0, priority: int = 0) -> uuid.UUID:
    """A row written by hand through the store's table object (any JSON as input), due now."""
    command_id = uuid7()
    now = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with outbox.engine.begin() as conn:
        conn.execute(
            sa.insert(outbox.store.table).values(
                id=command_id,
                name=name,
                target=target,
                status="pending",
                priority=priority,
                input=data,
                attempt=0,
                retries=retries,
                retries_left=retries,
                timeout=5.0,
                scheduled_at=now,
                created_at=now,
            )
        )
    return command_id


def insert_raw(outbox: Outbox, name: str, target: str, data: Any, *, retries: int = 0) -> uuid.UUID:
    """A row written by hand in plain SQL, the way someone with database access but no orch_outbox would."""
    command_id = uuid7()
    table = outbox.store.table.name  # a validated identifier
    with outbox.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (id, name, target, status, priority, input, attempt, retries, retries_left, "
                "timeout, scheduled_at, created_at) VALUES (:id, :name, :target, 'pending', 0, CAST(:input AS jsonb), "
                "0, :retries, :retries, 5, now(), now())"
            ),
            {"id": command_id, "name": name, "target": target, "input": json.dumps(data), "retries": retries},
        )
    return command_id


def test_hand_written_rows_with_unregistered_names_end_failed_not_found(
    worker_outbox: Callable[..., Outbox], tmp_path: Path
) -> None:
    """Kind 15 (guarantee 6): rows written in plain SQL naming commands no worker registered - one of them
    ``os.system`` with a shell command as input, one ``builtins.exec`` - make the worker import and call
    nothing: each attempt is recorded ``not_found`` (NotRegistered), a retry is consumed per attempt, the
    command ends ``failed`` without ever starting; the same worker then completes a good command."""
    outbox = worker_outbox()
    target = unique_target("hand")
    ran: list[int] = []
    marker = tmp_path / "pwned"

    @outbox.command(target=target, retries=0)
    def work(n: int) -> int:
        ran.append(n)
        return n

    with run_worker(outbox.app, [target]):
        unknown = insert_raw(outbox, "no_such_command", target, {"x": 1}, retries=1)
        shell = insert_raw(outbox, "os.system", target, {"command": f"touch {marker}"})
        code = insert_raw(outbox, "builtins.exec", target, {"source": f"open({str(marker)!r}, 'w')"})
        drain(outbox, timeout=WAIT)
        for command_id, attempts in ((unknown, 2), (shell, 1), (code, 1)):
            info = outbox.get(command_id)
            assert (info.status, info.outcome, info.attempt, info.retries_left) == ("failed", "not_found", attempts, 0)
            assert info.error is not None and info.error.type == "NotRegistered"
            assert info.name in info.error.message
            assert info.started_at is None and info.worker is None
        assert not marker.exists()

        good = work.push(outbox.engine, 7)
        drain(outbox, timeout=WAIT)
        assert (outbox.get(good).status, outbox.get(good).output, ran) == ("completed", 7, [7])


def test_hand_written_rows_with_unusable_input_or_output_end_failed(worker_outbox: Callable[..., Outbox]) -> None:
    """Kind 16: rows written by hand for a REGISTERED command whose input names an unknown parameter, misses
    a required one, or is not a JSON object at all (a string, a list - on a ``hide_input`` command, whose
    message carries no arguments), and commands whose handler returns what JSON cannot hold (a set, NaN,
    more than ``outbox_max_input_bytes``): each ends ``failed`` (outcome ``failure``) with the reason
    recorded, the handler of a bad input never runs, and the same worker then completes a good command."""
    outbox = worker_outbox()
    target = unique_target("rows")
    ran: list[Any] = []
    limit = outbox.settings.max_input_bytes

    @outbox.command(target=target, retries=0)
    def greet(name: str) -> str:
        ran.append(name)
        return f"hello {name}"

    @outbox.command(target=target, retries=0, hide_input=True)
    def secret(token: str) -> None:
        ran.append(token)

    @outbox.command(target=target, retries=0)
    def answer(kind: str) -> Any:
        return {"set": {1, 2}, "nan": math.nan, "huge": "x" * (limit + 1)}[kind]

    with run_worker(outbox.app, [target]):
        unknown_param = insert_row(outbox, "greet", target, {"evil": 1})
        missing_param = insert_row(outbox, "greet", target, {})
        text_input = insert_row(outbox, "secret", target, "just a string")
        list_input = insert_row(outbox, "secret", target, [1, 2])
        outputs = {kind: answer.push(outbox.engine, kind) for kind in ("set", "nan", "huge")}
        drain(outbox, timeout=WAIT)

        expected = {
            unknown_param: "stored input names an unknown parameter 'evil'",
            missing_param: "missing 1 required positional argument: 'name'",
            text_input: "",
            list_input: "",
            outputs["set"]: "output of answer: a set cannot be stored as JSON",
            outputs["nan"]: "output of answer: nan is not valid JSON",
            outputs["huge"]: "the limit (outbox_max_input_bytes)",
        }
        for command_id, fragment in expected.items():
            info = outbox.get(command_id)
            assert (info.status, info.outcome, info.attempt) == ("failed", "failure", 1), info
            assert info.error is not None and fragment in info.error.message, info.error
            assert info.output is None
        assert ran == []

        good = greet.push(outbox.engine, "ok")
        drain(outbox, timeout=WAIT)
        assert outbox.get(good).output == "hello ok" and ran == ["ok"]


def test_hand_written_row_with_non_object_input_does_not_jam_the_relay(worker_outbox: Callable[..., Outbox]) -> None:
    """Kind 16b: a hand-written row whose input is a JSON list, for a command that publishes its arguments,
    is recorded ``failed`` and does not stop the relay: a good command claimed in the same batch (after
    the poison row, which has the higher priority) is published and completes."""
    outbox = worker_outbox()
    target = unique_target("poison")

    @outbox.command(target=target, retries=0)
    def greet(name: str) -> str:
        return name

    with run_worker(outbox.app, [target]):
        poison = insert_row(outbox, "greet", target, [1, 2], priority=10)
        good = greet.push(outbox.engine, "ok")
        drain(outbox, timeout=WAIT)
        assert outbox.get(good).status == "completed"
        assert outbox.get(poison).status == "failed"


def test_plain_tasks_only_when_allowed(tmp_path: Path) -> None:
    """Kind 12b: with ``outbox_plain_tasks`` off, pushing a plain Celery task of the app raises UnknownCommand
    naming it and writes nothing; with it on (the default) the same push is accepted."""
    strict = Outbox(make_app(), f"sqlite:///{tmp_path}/strict.sqlite3", plain_tasks=False)
    strict.create_tables()

    @strict.app.task(name="plain_cleanup", shared=False)
    def plain_cleanup(days: int) -> None:
        never()

    with pytest.raises(UnknownCommand, match="'plain_cleanup'"):
        strict.push(strict.engine, plain_cleanup.s(3))
    assert strict.find() == []
    lenient = Outbox(make_app(), f"sqlite:///{tmp_path}/lenient.sqlite3")
    lenient.create_tables()

    @lenient.app.task(name="plain_cleanup", shared=False)
    def accepted(days: int) -> None:
        never()

    pushed = lenient.push(lenient.engine, accepted.s(3))
    assert (lenient.get(pushed).name, lenient.get(pushed).input) == ("plain_cleanup", {"days": 3})
    strict.close()
    lenient.close()


def test_hand_written_row_naming_a_plain_celery_task_runs_nothing(worker_outbox: Callable[..., Outbox]) -> None:
    """Kind 15b (guarantee 6): with ``outbox_plain_tasks`` off, a hand-written row naming a plain Celery task
    registered on the same app (not an outbox command) does not run that task; the row ends ``failed``."""
    outbox = worker_outbox(plain_tasks=False)
    target = unique_target("plain")
    ran: list[Any] = []

    @outbox.app.task(name=f"plain_{uuid.uuid4().hex[:8]}", shared=False)
    def delete_account(**kwargs: Any) -> None:
        ran.append(kwargs)

    with run_worker(outbox.app, [target]):
        row = insert_row(outbox, delete_account.name, target, {"user_id": 42})

        def settled() -> bool:
            outbox.relay_once()
            outbox.rescue_once()
            return bool(ran) or outbox.get(row).is_final

        wait_until(settled, WAIT, what="the hand-written row to be settled")
        assert ran == [], "a plain Celery task ran from a hand-written outbox row"
        assert outbox.get(row).status == "failed"


TRIPPED: list[str] = []


def _tripwire(what: str) -> str:
    TRIPPED.append(what)
    return what


class Tripwire:
    """Unpickling this calls ``_tripwire``: proof that a worker deserialised pickle."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_tripwire, ("unpickled",))


def queued(channel: Any, queue: Queue) -> int:
    """Messages waiting in a queue (Redis drops the key of an empty list: then 0)."""
    try:
        return int(queue.bind(channel).queue_declare(passive=True).message_count)
    except ChannelError:
        return 0


@pytest.mark.parametrize("broker", ["memory://", REDIS_DB11])
def test_pickle_message_is_refused_and_the_worker_keeps_serving(
    worker_outbox: Callable[..., Outbox], broker: str
) -> None:
    """Kind 17 (guarantee 6, never pickle): a pickle-serialised message injected into a command queue (in
    memory and on Redis) carrying the task name and outbox header of a real dispatched attempt is refused
    before decoding: the object inside is never unpickled, the message is consumed (not redelivered), the
    targeted row is untouched, and a good command queued behind it completes on the same worker."""
    TRIPPED.clear()
    outbox = worker_outbox(broker)
    target = unique_target("pickle")
    ran: list[int] = []

    @outbox.command(target=target, retries=0)
    def work(n: int) -> int:
        ran.append(n)
        return n

    victim = work.push(outbox.engine, 1)
    [claimed] = outbox.store.claim(10, 60.0)  # dispatched, attempt 1, no message published for it
    before = outbox.get(victim)
    queue = Queue(target, Exchange(target, type="direct"), routing_key=target)
    with run_worker(outbox.app, [target]), outbox.app.connection_for_write() as conn:
        Producer(conn.default_channel, serializer="pickle").publish(
            [(), {"n": Tripwire()}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
            exchange=queue.exchange,
            routing_key=target,
            declare=[queue],
            headers={
                "lang": "py",
                "task": "work",
                "id": f"{victim}:1",
                "root_id": f"{victim}:1",
                "outbox": [str(victim), claimed.attempt, 5.0],
            },
        )
        good = work.push(outbox.engine, 2)
        assert outbox.relay_once() == 1
        assert wait_for_status(outbox, good, "completed", "failed", timeout=WAIT).status == "completed"
        # the queue is FIFO: the pickle message, ahead of the good one, has been handled and acked
        assert queued(conn.default_channel, queue) == 0
    assert TRIPPED == []
    assert ran == [2]
    assert outbox.get(victim) == before


def test_messages_without_a_valid_outbox_header_run_nothing(worker_outbox: Callable[..., Outbox]) -> None:
    """Kind 18: messages for a registered command that did not come from the relay run nothing and change
    nothing: ``app.send_task(name)`` with positional and with keyword arguments carry no outbox header
    (``cmd.delay`` / ``cmd.apply_async`` push through the outbox instead: see
    tests/integration/test_celery_fidelity.py), another carries a garbage header - each is dropped and
    counted ``malformed``; a forged header naming a real command that is still pending is dropped as
    ``stale`` (the fenced start needs a dispatched attempt) and that command later runs exactly once,
    through the relay. An eager ``cmd.apply()`` is dropped the same way (only a plain function call
    ``cmd(...)`` runs the handler, as for any Celery task). The worker keeps serving."""
    outbox = worker_outbox()
    target = unique_target("header")
    ran: list[int] = []

    @outbox.command(target=target, retries=0)
    def work(n: int) -> int:
        ran.append(n)
        return n

    pending = work.push(outbox.engine, 100)
    dropped = outbox.executor.dropped
    with run_worker(outbox.app, [target]):
        outbox.app.send_task("work", args=[1], queue=target)
        outbox.app.send_task("work", kwargs={"n": 2}, queue=target)
        outbox.app.send_task("work", kwargs={"n": 3}, queue=target, headers={"outbox": ["garbage", "x", None]})
        outbox.app.send_task("work", kwargs={"n": 4}, queue=target, headers={"outbox": [str(pending), 1, 5.0]})
        wait_until(
            lambda: dropped["malformed"] >= 3 and dropped["stale"] >= 1,
            WAIT,
            what="the worker to drop the four foreign messages",
        )
        assert ran == []
        info = outbox.get(pending)
        assert (info.status, info.attempt, info.started_at) == ("pending", 0, None)

        assert work.apply((5,)).get() is None
        assert ran == [] and dropped["malformed"] == 4

        drain(outbox, timeout=WAIT)
        assert (outbox.get(pending).status, ran) == ("completed", [100])
    assert (dropped["malformed"], dropped["stale"]) == (4, 1)
