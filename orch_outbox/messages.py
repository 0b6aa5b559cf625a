"""The relay's task messages: what ``app.send_task`` would publish, built and sent at a fraction of its cost.

``send_task`` does for every message what the relay needs once per target: it merges the
task's execution options, asks the router, looks the queue up, merges the retry policy and
builds the message through ``as_task_v2``; it then links the result to a parent task, when
it runs inside one. A command's message depends only on its row and its target's queue, so
:class:`Messages` keeps the route of each target and writes each message as Celery's
protocol 2 lays it out (the same headers, properties and body, checked against
``send_task`` by ``tests/integration/test_messages.py``), then hands it to kombu's
``Producer.publish`` with its body already encoded: about half the CPU of ``send_task``.

Only where nothing else could tell the difference. :meth:`Messages.direct` is false, and
the relay uses ``send_task``, whenever Celery would do more for the message: a receiver of
``before_task_publish`` or ``after_task_publish`` (the OpenTelemetry Celery
instrumentation, a user's hook), ``task_send_sent_event``, ``task_compression``, a task
protocol other than 2, or a task with execution options of its own (its queue, exchange,
routing key, priority, delivery mode, time limits..., as a plain Celery task keeps them).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.app.routes import Router
from celery.utils.nodenames import anon_nodename
from kombu.utils.json import dumps

if TYPE_CHECKING:
    from celery import Celery

    from .store import Dispatch

#: The body's third part (callbacks, errbacks, chain, chord): a command carries none of them.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
#: Execution options of a task that ``send_task`` would carry into its message (a task sets one: not direct).
_OWN_OPTIONS = (
    "queue",
    "routing_key",
    "exchange",
    "priority",
    "expires",
    "delivery_mode",
    "compression",
    "time_limit",
    "soft_time_limit",
    "immediate",
    "mandatory",
)


@dataclass(frozen=True)
class Route:
    """Where the messages of one target go, as ``send_task`` decides it for ``queue=target``."""

    exchange: str
    routing_key: str
    delivery_mode: Any
    #: the kombu queue, declared with the first message on a connection
    queue: Any


class Messages:
    """Builds and publishes the task messages of claimed rows for one app (see the module docstring)."""

    def __init__(self, app: Celery, retry_policy: Mapping[str, Any], persistent: bool = False) -> None:
        """``retry_policy``: kombu's policy of a publish while the broker is unreachable (over Celery's own).
        ``persistent`` (``outbox_persistent_messages``): the messages' delivery mode is Celery's (persistent by
        default); otherwise transient (see :attr:`delivery_mode`)."""
        self.app = app
        self.persistent = persistent
        self._routes: dict[str, Route] = {}
        self._tasks: dict[str, bool] = {}
        self._origin = anon_nodename()
        self._given_policy = dict(retry_policy)
        self._policy: dict[str, Any] | None = None
        self._settings_allow: bool | None = None

    def direct(self, name: str) -> bool:
        """True when the message of task ``name`` may be published without ``send_task`` (nothing could tell)."""
        if signals.before_task_publish.receivers or signals.after_task_publish.receivers:
            return False
        if self._settings_allow is None:  # read once: Celery's settings are fixed once the app runs
            conf = self.app.conf
            self._settings_allow = not (conf.task_send_sent_event or conf.task_compression or conf.task_protocol != 2)
        if not self._settings_allow:
            return False
        plain = self._tasks.get(name)
        if plain is None:
            task = self.app.tasks.get(name)
            own = task._get_exec_options() if task is not None else {}
            plain = self._tasks[name] = not any(own.get(option) is not None for option in _OWN_OPTIONS)
        return plain

    @property
    def delivery_mode(self) -> int | None:
        """The outbox's delivery mode: transient (1), or None (Celery's, with ``outbox_persistent_messages``).

        A command's message is a copy of its row: the database keeps the command, the message
        only carries an attempt to a worker. A transient message lives in RabbitMQ's memory (it
        still confirms it, routed to its queue) and is never written to its disk, which costs
        the broker about 0.1 ms of CPU per message and takes a third of its work. If the broker
        restarts, the messages it held are gone; each command's dispatch lease then lapses with
        its queue empty, and the rescuer returns it to pending, no retry used (the lifecycle's
        lost message). Quorum queues keep every message on disk whatever the mode.
        """
        return None if self.persistent else 1

    def route(self, target: str) -> Route:
        """The route of ``target``'s messages (kept: a target's queue does not change while the app runs)."""
        route = self._routes.get(target)
        if route is None:
            amqp, conf = self.app.amqp, self.app.conf
            queue = amqp.queues[target]
            exchange = queue.exchange
            delivery_mode = self.delivery_mode or getattr(exchange, "delivery_mode", None)
            delivery_mode = delivery_mode or conf.task_default_delivery_mode
            if getattr(exchange, "type", "direct") == "direct":
                route = Route("", target, delivery_mode, queue)
            else:
                name = exchange.name or conf.task_default_exchange
                route = Route(name, queue.routing_key or conf.task_default_routing_key, delivery_mode, queue)
            self._routes[target] = route
        return route

    def publish(
        self,
        producer: Any,
        item: Dispatch,
        kwargs: Mapping[str, Any],
        kwargsrepr: str,
        headers: Mapping[str, Any],
        properties: Mapping[str, Any],
        declare: bool,
        retry: bool,
    ) -> None:
        """Publish ``item``'s message as ``send_task(name, kwargs=..., task_id=str(id), queue=target, ...)`` would."""
        task_id = str(item.id)
        route = self.route(item.target)
        expires = item.expires_at
        message_headers = {
            "lang": "py",
            "task": item.name,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None if expires is None else expires.isoformat(),
            "group": None,
            "group_index": None,
            "retries": item.retries - item.retries_left,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": kwargsrepr,
            "origin": self._origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
            **headers,
        }
        # send_task also passes its argsrepr and kwargsrepr on as properties: AMQP drops them, Redis keeps them.
        extra = {"argsrepr": "()", "kwargsrepr": kwargsrepr, **properties}
        if expires is not None:  # a per-message TTL on the broker, as send_task sets it
            extra["expiration"] = max((expires - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)
        producer.publish(
            dumps(((), kwargs, _EMBED)),  # type: ignore[no-untyped-call]
            exchange=route.exchange,
            routing_key=route.routing_key,
            content_type="application/json",
            content_encoding="utf-8",
            retry=retry,
            retry_policy=self._retry_policy(),
            delivery_mode=route.delivery_mode,
            declare=[route.queue] if declare else [],
            headers=message_headers,
            correlation_id=task_id,
            reply_to=self.app.thread_oid,
            **extra,
        )

    @functools.cached_property
    def target_router(self) -> Any:
        """The router of the relay's ``send_task``: a row's message goes to its target's queue, with the task's own
        options, and the app's ``task_routes`` are not asked again.

        They were asked when the command was pushed, with the call's own arguments; a message
        carries the command's input as keyword arguments, so a router function given them
        again could answer otherwise, or fail (one reading ``args[0]`` would stop every
        publish of the batch).
        """
        create_missing = self.app.conf.task_create_missing_queues
        return Router(routes=(), queues=self.app.amqp.queues, create_missing=create_missing, app=self.app)

    def _retry_policy(self) -> dict[str, Any]:
        """The publish retry policy, merged over ``task_publish_retry_policy`` as ``send_task`` merges it."""
        policy = self._policy
        if policy is None:
            policy = self._policy = dict(self.app.conf.task_publish_retry_policy or {}, **self._given_policy)
        return policy
