"""Starts in the worker's consumer (starting.py, ``outbox_start_in_consumer``): the main process claims for its pool.

What a user relies on: with the option on and the threads or prefork pool, the attempts of the messages a
worker receives are claimed by its main process, many per round trip, and the pool's
threads run handlers without claiming; a claim that waited too long is checked again, so
an attempt canceled or rescued meanwhile never runs; and the claims of messages no pool
process took go back to ``dispatched`` at shutdown, so their redelivered messages start
them again at once, without waiting for a lease to lapse.
"""

from __future__ import annotations

import threading
import time
import types
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker

from orch_outbox import Outbox, starting
from orch_outbox.executor import parse_header
from orch_outbox.request import AttemptDropped, CommandRevoked
from orch_outbox.starting import CLAIM_KEY, Starter
from orch_outbox.testing import wait_until

from .support import unique_target

pytestmark = pytest.mark.pg


def declare(outbox: Outbox, target: str, timeout: float = 30.0) -> Any:
    """A command on ``target`` whose handler notes its argument in ``job.ran``."""
    ran: list[int] = []

    @outbox.command(name=f"starting_job_{target}", target=target, retries=0, timeout=timeout)
    def job(n: int) -> int:
        ran.append(n)
        return n

    job.ran = ran  # type: ignore[attr-defined]
    return job


def dispatched(outbox: Outbox, target: str, n: int, timeout: float = 30.0) -> tuple[Any, list[uuid.UUID]]:
    """A command on ``target`` and ``n`` of its rows claimed by the relay (dispatched, attempt 1)."""
    job = declare(outbox, target, timeout)
    ids = outbox.push_many(outbox.engine, [job.s(i) for i in range(n)])
    outbox.relay_once()
    assert {outbox.get(i).status for i in ids} == {"dispatched"}
    return job, ids


def fake_request(outbox: Outbox, command_id: uuid.UUID, name: str) -> Any:
    """What Celery's consumer hands the starter: a request with the message's ``outbox`` header."""
    row = outbox.get(command_id)
    header = [str(command_id), row.attempt, row.timeout]
    return types.SimpleNamespace(id=str(command_id), name=name, request_dict={"outbox": header})


def test_a_threads_worker_claims_in_its_main_process(make_outbox: Callable[..., Outbox]) -> None:
    """``outbox_start_in_consumer``: every attempt is claimed by the starter thread (``start_many``), none by a pool
    thread; all complete."""
    outbox = make_outbox(start_in_consumer=True)
    target = unique_target("st")
    job = declare(outbox, target)
    ids = outbox.push_many(outbox.engine, [job.s(i) for i in range(40)])
    claimers: list[str] = []
    store = outbox.store
    start_many = store.start_many

    def counting(items: Any) -> Any:
        claimers.extend(threading.current_thread().name for _ in items)
        return start_many(items)

    store.start_many = counting  # type: ignore[method-assign]
    start = store.start
    pool_starts: list[str] = []

    def single(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name != "orch-outbox-starter":
            pool_starts.append(threading.current_thread().name)
        return start(*args, **kwargs)

    store.start = single  # type: ignore[method-assign]
    outbox.app.conf.broker_transport_options = {"polling_interval": 0.02}
    with start_worker(
        outbox.app, pool="threads", concurrency=4, queues=[target], perform_ping_check=False, loglevel="WARNING"
    ):
        outbox.relay_once()
        wait_until(lambda: all(outbox.get(i).status == "completed" for i in ids), 30, what="every command to complete")
    assert sorted(job.ran) == list(range(40))
    assert len(claimers) == 40 and set(claimers) == {"orch-outbox-starter"}, claimers
    assert pool_starts == []


def test_by_default_the_pool_claims_for_itself(make_outbox: Callable[..., Outbox]) -> None:
    """By default (``outbox_start_in_consumer`` off) each pool thread claims its own attempt right before its
    handler, so a cancel or pause reaches every message not yet running, prefetched ones included."""
    outbox = make_outbox()
    target = unique_target("st")
    _job, ids = dispatched(outbox, target, 10)
    store = outbox.store
    start_many = store.start_many
    batched: list[int] = []
    store.start_many = lambda items: batched.append(len(items)) or start_many(items)  # type: ignore[method-assign]
    outbox.app.conf.broker_transport_options = {"polling_interval": 0.02}
    with start_worker(
        outbox.app, pool="threads", concurrency=2, queues=[target], perform_ping_check=False, loglevel="WARNING"
    ):
        wait_until(lambda: all(outbox.get(i).status == "completed" for i in ids), 30, what="every command to complete")
    assert batched == []


def test_the_starter_claims_in_order_and_returns_untaken_claims_at_stop(make_outbox: Callable[..., Outbox]) -> None:
    """The starter hands requests on in the order received, each with its claim; at stop, those no pool process
    accepted go back to ``dispatched`` with the same attempt, and their message can start them again."""
    outbox = make_outbox()
    target = unique_target("st")
    job, ids = dispatched(outbox, target, 5)
    handed: list[Any] = []
    starter = Starter(outbox.store, parse_header, 10.0, lambda: "w1@host")
    requests = [fake_request(outbox, i, job.name) for i in ids]
    for request in requests:
        starter.submit(request, handed.append)
    wait_until(lambda: len(handed) == 5, 10, what="the requests to be handed on")
    assert [r.id for r in handed] == [str(i) for i in ids]
    assert all(r.request_dict[CLAIM_KEY][1] == i for r, i in zip(handed, ids, strict=True))
    assert {outbox.get(i).status for i in ids} == {"running"}
    assert {outbox.get(i).worker for i in ids} == {"w1@host"}
    for request in handed[:2]:  # two were taken by pool processes (Celery's on_accepted)
        claim = request.request_dict[CLAIM_KEY]
        starter.accepted(claim[1], claim[4])
    assert starter.stop() == 3
    rows = [outbox.get(i) for i in ids]
    assert [r.status for r in rows] == ["running"] * 2 + ["dispatched"] * 3
    assert {r.attempt for r in rows} == {1}
    again = outbox.store.start(ids[4], 1, job.name, "w2@host", 30.0)
    assert again is not None and outbox.get(ids[4]).worker == "w2@host"


def test_a_refused_claim_goes_to_the_pool_without_one(make_outbox: Callable[..., Outbox]) -> None:
    """A message whose attempt cannot be claimed (here: canceled before it arrived) is handed on with no claim:
    the pool process then claims for itself and reports why it ran nothing."""
    outbox = make_outbox()
    target = unique_target("st")
    job, ids = dispatched(outbox, target, 1)
    outbox.cancel(ids[0])
    handed: list[Any] = []
    starter = Starter(outbox.store, parse_header, 10.0, lambda: "w1@host")
    starter.submit(fake_request(outbox, ids[0], job.name), handed.append)
    wait_until(lambda: len(handed) == 1, 10, what="the request to be handed on")
    assert CLAIM_KEY not in handed[0].request_dict
    starter.stop()


@pytest.mark.parametrize("waited", [0.0, starting.FRESH_SECONDS + 1.0])
def test_a_claim_that_waited_is_checked_again(make_outbox: Callable[..., Outbox], waited: float) -> None:
    """A fresh claim runs the handler without another round trip. A claim that waited past ``FRESH_SECONDS`` in
    the pool's queue is renewed first: if its command was canceled meanwhile it ends ``canceled`` and if its
    attempt lost the command (rescued: no longer running) it runs nothing; in neither case does the handler run."""
    outbox = make_outbox()
    target = unique_target("st")
    job, ids = dispatched(outbox, target, 3)
    starter = Starter(outbox.store, parse_header, 10.0, lambda: "w1@host")
    handed: list[Any] = []
    for i in ids:
        starter.submit(fake_request(outbox, i, job.name), handed.append)
    wait_until(lambda: len(handed) == 3, 10, what="the requests to be handed on")
    starter.stop()  # (nothing was accepted: its claims go back; claimed again below for the test's own use)
    rows = outbox.store.start_many([(i, 1, job.name, "w1@host", 30.0) for i in ids])
    store = outbox.store
    renewals: list[Any] = []
    renew = store.renew
    store.renew = lambda attempts, lease: renewals.append(attempts) or renew(attempts, lease)  # type: ignore[method-assign]
    outbox.cancel(ids[1])  # canceled while its message waited in the pool
    store.unstart([(ids[2], 1)], 30.0)  # its attempt no longer runs (as after a rescue)
    at = time.monotonic() - waited
    requests = [
        types.SimpleNamespace(
            hostname="w1@host",
            outbox=fake_request(outbox, i, job.name).request_dict["outbox"],
            **{CLAIM_KEY: (at, *starting._fields(row))},
        )
        for i, row in zip(ids, rows, strict=True)
    ]
    assert executor_run(outbox, job, requests[0]) == 0
    if waited:
        with pytest.raises(CommandRevoked):
            executor_run(outbox, job, requests[1])
        assert outbox.get(ids[1]).status == "canceled"
        with pytest.raises(AttemptDropped):
            executor_run(outbox, job, requests[2])
        assert outbox.get(ids[2]).status == "dispatched"
        assert len(renewals) == 3
        assert job.ran == [0]
    else:  # trusted as is: no round trip before the handler (the cancel reaches a running handler as always)
        assert renewals == []
        assert executor_run(outbox, job, requests[1]) == 1
        assert job.ran == [0, 1]


def executor_run(outbox: Outbox, job: Any, request: Any) -> Any:
    return outbox.executor.execute(job, request)


def test_waiting_claims_are_renewed_until_taken(make_outbox: Callable[..., Outbox]) -> None:
    """A claim waiting for a pool process (behind long handlers) has its lease renewed by the starter about once a
    second, so the rescuer never takes it for a lost worker's; once taken, the starter leaves it to the pool."""
    outbox = make_outbox()
    target = unique_target("st")
    job, ids = dispatched(outbox, target, 2, timeout=0.5)  # claimed with a lease of 0.5 + 120 s
    store = outbox.store
    renewed: list[set[uuid.UUID]] = []
    renew = store.renew
    store.renew = lambda attempts, lease: renewed.append({i for i, _ in attempts}) or renew(attempts, lease)  # type: ignore[method-assign]
    starter = Starter(store, parse_header, 120.0, lambda: "w1@host")  # a renewal moves the lease: now + 120 s
    handed: list[Any] = []
    for i in ids:
        starter.submit(fake_request(outbox, i, job.name), handed.append)
    wait_until(lambda: len(handed) == 2, 10, what="the requests to be handed on")
    first = {i: outbox.get(i).lease_expires_at for i in ids}
    wait_until(lambda: renewed, 10, what="a renewal of the waiting claims")
    assert renewed[0] == set(ids)
    assert all(outbox.get(i).lease_expires_at > first[i] for i in ids)
    claim = handed[0].request_dict[CLAIM_KEY]
    starter.accepted(claim[1], claim[4])
    count = len(renewed)
    wait_until(lambda: len(renewed) > count, 10, what="the next renewal")
    assert renewed[-1] == {ids[1]}
    starter.stop()
