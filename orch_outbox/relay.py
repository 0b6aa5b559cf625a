"""The relay publishes due commands (the rescuer is in rescuer.py, the listening loop in listener.py).

Relay, per batch: one transaction claims due rows (pending → dispatched, attempt + 1,
``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and commits; then each row is published as
its command's Celery task to the queue named by its target. A crash after the commit
and before the publish leaves rows dispatched with no message: their dispatch lease
lapses and the rescuer returns them to pending, no retry consumed. A publish that fails
returns the unpublished rows to pending at once.

The relay receives what it uses (the app, the store, the settings, the result backend
writer and the check of runnable names), not the whole Outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .amqpwire import coalesced_writes, lean_messages
from .errors import StoreUnavailable, UnknownCommand
from .flow import Limit, Plan
from .messages import Messages
from .store import Dispatch, ErrorInfo
from .telemetry import OFF, Telemetry

if TYPE_CHECKING:
    from celery import Celery

    from .results import Results
    from .settings import Settings
    from .store import Store

log = logging.getLogger("orch_outbox.relay")

#: Longest one relay run keeps claiming before it yields to the next tick.
RUN_BUDGET_SECONDS = 5.0
#: kombu retry policy for one publish while the broker is unreachable.
#: Longest pause of the relay while the broker keeps failing.
BROKER_BACKOFF_MAX = 30.0
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 1.0}


class Relay:
    """Claims due commands and publishes them as Celery task messages."""

    def __init__(
        self,
        app: Celery,
        store: Store,
        settings: Settings,
        results: Results,
        runnable: Callable[[str], Any],
        telemetry: Telemetry = OFF,
    ) -> None:
        """``runnable(name)`` raises :class:`UnknownCommand` for a task name a row may not run."""
        self.telemetry = telemetry
        self.app = app
        self.store = store
        self.settings = settings
        self.results = results
        self.runnable = runnable
        #: while the broker is failing: no claims before this monotonic time (exponential backoff).
        self.broker_retry_at = 0.0
        self.broker_failures = 0
        self._producer: Any = None
        self._confirms: _Confirms | None = None
        #: target queues declared on the producer's current connection
        self._declared: set[str] = set()
        self._lock = threading.Lock()
        self._plan: Plan | None = None
        self._driver: str | None = None
        self._strict: tuple[tuple[str, ...], ...] = ()
        self._depth_conn: Any = None
        self._depth_lock = threading.Lock()
        self._strict_until = 0.0
        self._plan_tasks = -1
        #: messages of commands published without ``send_task`` where nothing could tell the difference
        self.messages = Messages(app, PUBLISH_RETRY_POLICY, settings.persistent_messages)

    def run_once(self, budget: float = RUN_BUDGET_SECONDS) -> int:
        """Claim and publish batches until none is full or the budget is spent; returns rows published.

        After a publish failed, runs are skipped until the broker backoff (doubling from
        0.5 s up to 30 s) has passed; the commands wait in the database meanwhile.
        """
        if time.monotonic() < self.broker_retry_at or not self._lock.acquire(blocking=False):
            return 0  # the broker is backing off, or another thread of this process is relaying
        try:
            return self._run(budget)
        finally:
            self._lock.release()

    def _run(self, budget: float) -> int:
        deadline = time.monotonic() + budget
        published = 0
        while True:
            try:
                batch = self.store.claim(
                    self.settings.batch_size,
                    self.settings.dispatch_timeout,
                    self.settings.max_in_flight,
                    on_expired=self._expired,
                    plan=self.plan(),
                )
            except StoreUnavailable as exc:
                log.warning("relay: %s", exc)
                return published
            if not batch:
                return published
            with self.telemetry.publishing(len(batch)):
                sent = self.publish(batch)
            published += sent
            if sent < len(batch) or len(batch) < self.settings.batch_size or time.monotonic() > deadline:
                return published

    def plan(self) -> Plan:
        """The flow control in force: the settings' limits, the commands' own, and fair shares between tenants.

        Rebuilt when the app registers more tasks (a command's own limit comes with it);
        a key in ``outbox_limits`` wins over a command's ``@command(concurrency=, rate=)``.
        """
        tasks = self.app.tasks
        strict = self._strict_groups()
        if self._plan is None or self._plan_tasks != len(tasks) or self._plan.strict != strict:
            configured = {limit.key: limit for limit in self.settings.limits}
            own = [getattr(task, "outbox_limit", None) for task in list(tasks.values())]
            merged = {limit.key: limit for limit in own if isinstance(limit, Limit)} | configured
            s = self.settings
            self._plan = Plan(tuple(merged.values()), s.fair_tenants, s.poll_interval, strict)
            self._plan_tasks = len(tasks)
        return self._plan

    def _strict_groups(self) -> tuple[tuple[str, ...], ...]:
        """With ``outbox_strict_order``: the queue orders of the registered workers (read once a heartbeat)."""
        if not self.settings.strict_order:
            return ()
        now = time.monotonic()
        if now >= self._strict_until:
            try:
                rows, _ = self.store.list_workers()
            except StoreUnavailable:
                return self._strict
            self._strict = tuple(sorted({tuple(r["queues"]) for r in rows if len(r["queues"]) > 1}))
            self._strict_until = now + self.settings.worker_heartbeat
        return self._strict

    def publish(self, batch: list[Dispatch]) -> int:
        """Publish a claimed batch; rows the broker did not take (or confirm) go back to pending.

        On AMQP the whole batch is published, then the broker's confirms are awaited once
        (one round trip per batch, not per message); on Redis the batch is one pipeline
        (one round trip). A message published but not
        confirmed (nacked, or the connection failed first) has its row returned to
        pending; if the message did reach a queue after all, its attempt no longer
        matches the row and the worker drops it, so nothing runs twice.
        """
        done = 0
        unconfirmed: list[Dispatch] = []
        try:
            producer = self._open_producer()
            confirms = self._confirms
            # Redis: the batch's messages go in one pipeline, sent when the block ends (kombu's Producer.batch; on
            # AMQP it publishes at once). Until then a message is as unconfirmed as one awaiting a confirm.
            deferred = confirms is None and producer.supports_batch_publish
            checked: dict[tuple[str, str], tuple[str, ErrorInfo] | None] = {}
            with producer.batch(max(len(batch), 1)), coalesced_writes(producer.connection):
                for item in batch:
                    refusal = self._refusal(item, checked)
                    if refusal is None:
                        if confirms is not None:
                            confirms.expect(item)
                        self._send(producer, item, retry=confirms is None)
                        if confirms is not None or deferred:
                            unconfirmed.append(item)
                    else:
                        self._refuse(item, refusal)
                    done += 1
            if deferred:
                unconfirmed = []
            if confirms is not None:
                nacked = confirms.wait(CONFIRM_TIMEOUT)
                expected, unconfirmed = len(unconfirmed), []
                if nacked:
                    self.store.undispatch(nacked)
                    self._refused_by_broker(len(nacked), expected)
                    return done - len(nacked)
        except Exception as exc:  # broker errors of any transport (py-amqp's are not all KombuError/OSError)
            self.close()
            unsent = [*unconfirmed, *batch[done:]]
            sent = done - len(unconfirmed)
            self.broker_failures += 1
            pause = min(BROKER_BACKOFF_MAX, 0.5 * 2 ** min(self.broker_failures - 1, 10))
            self.broker_retry_at = time.monotonic() + pause
            log.warning(
                "relay: broker unavailable (%s); %d command(s) stay pending; next try in %.1fs", exc, len(unsent), pause
            )
            try:
                self.store.undispatch(unsent)
            except StoreUnavailable:
                log.warning("relay: could not return %d row(s) to pending; their dispatch lease will", len(unsent))
            return sent
        if self.broker_failures:
            log.info("relay: broker back after %d failed attempt(s)", self.broker_failures)
            self.broker_failures = 0
        return done

    def _refused_by_broker(self, refused: int, sent: int) -> None:
        """The broker nacked ``refused`` of the batch's ``sent`` messages (their rows are pending again).

        Some of them (a queue at its length limit with ``reject-publish``): the channel goes on.
        All of them: the next batch goes on a new connection and channel. RabbitMQ's channel
        keeps its own view of where a quorum queue's members are, and after a node's loss one
        can go on refusing every message to a queue the cluster serves again
        (rabbitmq-server#15333). The relay does not pause for it: other targets' commands
        would wait with the refused ones.
        """
        if refused < sent:
            log.warning("relay: the broker refused %d of %d message(s); they stay pending", refused, sent)
            return
        self.close()
        log.warning(
            "relay: the broker refused every message of the batch (%d); they stay pending; the next batch goes on a "
            "new connection",
            refused,
        )

    def _expired(self, ids: list[Any]) -> None:
        """Commands the claim found past their expiry: ``REVOKED`` (expired) in the result backend."""
        self.telemetry.count("expired", len(ids))
        for command_id in ids:
            self.results.revoked(command_id, "", "expired")

    def _refusal(
        self, item: Dispatch, checked: dict[tuple[str, str], tuple[str, ErrorInfo] | None]
    ) -> tuple[str, ErrorInfo] | None:
        """(outcome, error) of a claimed row that must not become a message, or None.

        Rows are written by the outbox, but anyone with access to the table can write
        one: a name this app knows as a task the outbox may not run (``celery.*``, the
        outbox's own services, plain Celery tasks when ``outbox_plain_tasks`` is off; see
        ``Outbox.runnable``) must never run from a row; nor can an input that is not a
        JSON object be a command's arguments; nor, with Celery's ``task_create_missing_queues``
        off, a target with no queue in the user's ``task_queues`` (the relay declares the
        user's queues as Celery does, quorum or not, and makes no other).
        """
        # ``checked``: the refusals of names and targets met in this batch (the registry and settings hold for a batch)
        name, target = ("name", item.name), ("target", item.target)
        if name not in checked:
            checked[name] = self._refusal_of_name(item.name)
        if checked[name] is not None:
            return checked[name]
        if not isinstance(item.input, dict):
            kind = type(item.input).__name__
            return "failure", ErrorInfo("InvalidInput", f"the stored input is a {kind}, not a JSON object of arguments")
        if target not in checked:
            checked[target] = self._refusal_of_target(item.target)
        return checked[target]

    def _refusal_of_name(self, name: str) -> tuple[str, ErrorInfo] | None:
        if name in self.app.tasks:
            try:
                self.runnable(name)
            except UnknownCommand:
                return "not_found", ErrorInfo("NotACommand", f"{name!r} is not a command; a row cannot run it")
        return None

    def _refusal_of_target(self, target: str) -> tuple[str, ErrorInfo] | None:
        if not self.app.conf.task_create_missing_queues and target not in self.app.amqp.queues:
            return "failure", ErrorInfo(
                "QueueNotFound",
                f"target {target!r} has no queue in task_queues and task_create_missing_queues is False: "
                "declare it there (then requeue this command)",
            )
        return None

    def _refuse(self, item: Dispatch, refusal: tuple[str, ErrorInfo]) -> None:
        outcome, error = refusal
        log.error("relay: refused command %s (%s): %s", item.id, item.name, error.message)
        try:
            if self.store.refuse(item.id, item.attempt, outcome, error):
                self.results.failed(item.id, item.name, error)
        except StoreUnavailable:
            log.warning("relay: could not record the refusal of %s; its dispatch lease will return it", item.id)

    def _open_producer(self) -> Any:
        """The relay's own producer, kept open across runs; its channel in confirm mode on AMQP."""
        if self._producer is None:
            # The relay awaits confirms per batch (``_Confirms``); kombu's ``confirm_publish``
            # would wait for each message on top of that.
            conn = self.app.connection_for_write(transport_options={"confirm_publish": False})
            try:
                conn.ensure_connection(max_retries=1)
                producer = self.app.amqp.Producer(conn)
                channel = producer.channel
                lean_messages(channel)
                self._confirms = _Confirms(channel) if hasattr(channel, "confirm_select") else None
                self._producer = producer
            except BaseException:
                conn.release()
                raise
        return self._producer

    def queue_depth(self, target: str) -> int | None:
        """Messages the broker holds for ``target`` (ready ones; on Redis every priority list), None if it cannot
        say. On a connection of its own (the rescuer's thread), kept open across calls."""
        with self._depth_lock:
            try:
                if self._depth_conn is None:
                    self._depth_conn = self.app.connection_for_read()
                    self._depth_conn.ensure_connection(max_retries=1)
                channel = self._depth_conn.default_channel
                return int(channel.queue_declare(queue=target, passive=True).message_count)
            except Exception as exc:  # a missing queue (404 closes the channel), a broker down: it cannot say
                log.debug("relay: depth of %s unknown: %s", target, exc)
                conn, self._depth_conn = self._depth_conn, None
                if conn is not None:
                    try:
                        conn.release()
                    except Exception as close_exc:
                        log.debug("relay: closing the depth connection: %s", close_exc)
                return None

    def close(self) -> None:
        """Release the relay's broker connection (it reopens on the next run)."""
        self._confirms = None
        self._declared = set()
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.connection.release()
            except Exception as exc:  # closing a broken connection may fail too
                log.debug("relay: closing the broker connection: %s", exc)

    def _send(self, producer: object, item: Dispatch, retry: bool = True) -> None:
        # The executor reads the input from the row; the message carries it only so that
        # logs and Flower show it, unless the command hides it.
        # One Celery task id per command, its command id (as Celery's own retries keep one
        # id); the attempt travels in the header, which fences the worker's start.
        hidden = getattr(self.app.tasks.get(item.name), "outbox_hide_input", False)
        if item.trace and self.telemetry.on:  # a publish span in the push's trace, its context in the headers
            with self.telemetry.publish(item.trace, item.id, item.target) as carried:
                self._publish(producer, item, hidden, retry, carried)
        else:
            self._publish(producer, item, hidden, retry, {})
        self._declared.add(item.target)

    def _publish(self, producer: object, item: Dispatch, hidden: bool, retry: bool, carried: dict[str, str]) -> None:
        kwargs = {} if hidden else item.input
        kwargsrepr = "<hidden>" if hidden else _kwargsrepr(item.input, self.app.amqp.kwargsrepr_maxsize)
        if self.messages.direct(item.name):
            self.messages.publish(
                producer,
                item,
                kwargs,
                kwargsrepr,
                {"outbox": [str(item.id), item.attempt, item.timeout], **carried},
                self._priority(producer, item.priority),
                declare=item.target not in self._declared,
                retry=retry,
            )
            return
        self.app.send_task(
            item.name,
            kwargs=kwargs,
            argsrepr="()",
            kwargsrepr=kwargsrepr,
            serializer="json",
            task_id=str(item.id),
            queue=item.target,
            headers={"outbox": [str(item.id), item.attempt, item.timeout], **carried},
            expires=item.expires_at,
            retries=item.retries - item.retries_left,
            **self._priority(producer, item.priority),
            **self._delivery_mode(item.name),
            producer=producer,
            router=self.messages.target_router,
            retry=retry,
            retry_policy=PUBLISH_RETRY_POLICY,
            # Celery declares the queue at every publish (kombu then finds it in its cache,
            # after copying and binding the queue object: a sixth of a publish). Once per
            # connection is what that cache amounts to; a new connection declares again.
            **({"declare": []} if item.target in self._declared else {}),
        )

    def _delivery_mode(self, name: str) -> dict[str, int]:
        """The outbox's delivery mode (``Messages.delivery_mode``), unless the task has one of its own."""
        mode = self.messages.delivery_mode
        own = getattr(self.app.tasks.get(name), "delivery_mode", None)
        return {} if mode is None or own is not None else {"delivery_mode": mode}

    def _priority(self, producer: Any, priority: int) -> dict[str, int]:
        """The message priority, with ``outbox_broker_priority``: the command's own on AMQP (a queue declared with
        ``x-max-priority`` by Celery's ``task_queue_max_priority`` honours it), reversed into kombu's 0 (first)
        to 9 on Redis; nothing otherwise (the database orders the backlog either way)."""
        if not self.settings.broker_priority:
            return {}
        driver = self._driver
        if driver is None:
            driver = self._driver = producer.connection.transport.driver_type
        if driver == "amqp":
            return {"priority": priority}
        if driver == "redis":
            return {"priority": 9 - min(priority, 9)}
        return {}


def _kwargsrepr(data: Any, limit: int) -> str:
    """What Flower shows as the task's keyword arguments: the stored input (already plain JSON data).

    Celery would build it with ``saferepr``, which walks the value item by item; the
    input is JSON data, so its ``repr`` is safe and cheaper.
    """
    text = repr(data)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


#: Longest wait for the broker to confirm a published batch.
CONFIRM_TIMEOUT = 10.0


class _Confirms:
    """Publisher confirms of one AMQP channel, awaited per batch instead of per message.

    In confirm mode the broker numbers *every* message published on a channel 1, 2, ...
    and acks (or nacks) them, singly or up to a number. A command may cost more than one
    message on the relay's channel (Celery publishes its ``task-sent`` event there when
    ``task_send_sent_event`` is on), so every publish on the channel is counted where it
    happens: the channel's ``basic_publish`` is wrapped, and each number is booked to the
    command being sent (``expect`` names it). A command is confirmed once all its
    messages are; a nack of any of them returns it to pending.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_select()
        self.last_tag = 0
        self.pending: dict[int, Dispatch] = {}
        self.nacked: dict[Any, Dispatch] = {}
        self._current: Dispatch | None = None
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)
        publish = channel.basic_publish

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.last_tag += 1
            if self._current is not None:
                self.pending[self.last_tag] = self._current
            return publish(*args, **kwargs)

        channel.basic_publish = counted

    def expect(self, item: Dispatch) -> None:
        """The messages published from now on belong to ``item``."""
        self._current = item

    def _settled(self, tag: int, multiple: bool) -> list[Dispatch]:
        tags = [t for t in self.pending if t <= tag] if multiple else [tag]
        return [item for t in tags if (item := self.pending.pop(t, None)) is not None]

    def _ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settled(delivery_tag, multiple)

    def _nack(self, delivery_tag: int, multiple: bool) -> None:
        for item in self._settled(delivery_tag, multiple):
            self.nacked[item.id] = item

    def wait(self, timeout: float) -> list[Dispatch]:
        """Block until every expected message is acked or nacked; returns the nacked ones."""
        deadline = time.monotonic() + timeout
        while self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the broker did not confirm {len(self.pending)} message(s) in {timeout:g}s")
            self.channel.connection.drain_events(timeout=left)
        self._current = None
        nacked, self.nacked = list(self.nacked.values()), {}
        return nacked
