"""Flow control, decided in the claim: cluster-wide limits and fair shares between tenants.

A **limit** caps how many commands of one key are in flight at once (``concurrency``:
dispatched or running, so never more than that many run anywhere in the cluster) and how
fast they start (``rate``, Celery's syntax: ``"100/m"``, ``"5/s"``, ``"30/h"``; a token
bucket that holds at most one poll interval's worth, so starts are spaced as Celery's own
``rate_limit`` spaces them, but across the cluster). A key is a target (``"email-worker"``),
a command (``"command:send_email"``), one tenant (``"tenant:acme"``) or each tenant
(``"tenant:*"``). The claim counts what is in flight from the database in its own
transaction, under one lock per outbox, so several relays together keep every limit.

**Strict order** (``outbox_strict_order``): a worker started with ``-Q high,default,low``
registers its queues in that order; the claim then publishes to ``default`` only while
``high`` has nothing waiting (no due pending command, no message published and not yet
started), and to ``low`` only while neither has, as a worker popping its queues in order.

**Fairness**: the due commands of each tenant are taken in turns (the first of every
tenant, then the second of every tenant, ...), within each priority: a tenant with 100 000
queued commands delays one with 10 by at most one claim batch. Commands without a tenant
are one more participant; without tenants the order is priority, then due time.

This module is pure: the plan (which limits apply to which row) and the admission (which
candidates a claim takes). The statements are in ``store/flow.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from celery.utils.time import rate as celery_rate

from .errors import ConfigurationError

SCOPES = ("target", "command", "tenant")
#: The key of a limit that applies to each tenant on its own.
EACH_TENANT = "tenant:*"


@dataclass(frozen=True)
class Limit:
    """One limit: ``key`` as written (``email-worker``, ``command:x``, ``tenant:y``, ``tenant:*``)."""

    key: str
    concurrency: int | None = None
    #: starts per second (Celery's ``rate()`` of the ``rate`` string), None: no rate limit
    per_second: float | None = None
    rate: str | None = None

    @property
    def scope(self) -> str:
        head, _, rest = self.key.partition(":")
        return head if rest and head in ("command", "tenant") else "target"

    @property
    def value(self) -> str:
        """The target, command name or tenant the limit is about (``*`` for each tenant)."""
        return self.key.partition(":")[2] if self.scope != "target" else self.key

    def describe(self) -> str:
        parts = [f"concurrency {self.concurrency}"] if self.concurrency is not None else []
        if self.rate is not None:
            parts.append(f"rate {self.rate}")
        return ", ".join(parts)


def parse_rate(value: object, where: str) -> float:
    """Starts per second of a Celery rate string (``"100/m"``); a clear error for anything else."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigurationError(f"{where}: rate must be like '100/m', '5/s' or '30/h', got {value!r}")
    try:
        per_second = float(celery_rate(value))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigurationError(f"{where}: rate must be like '100/m', '5/s' or '30/h', got {value!r}") from None
    if not per_second > 0 or math.isinf(per_second):
        raise ConfigurationError(f"{where}: rate must be positive, got {value!r}")
    return per_second


def make_limit(key: str, concurrency: object = None, rate: object = None, where: str = "outbox_limits") -> Limit:
    """A validated :class:`Limit` (``where`` names the setting or command in errors)."""
    if not isinstance(key, str) or not key or key in ("command:", "tenant:"):
        raise ConfigurationError(f"{where}: a limit key must be a target, 'command:NAME' or 'tenant:NAME', got {key!r}")
    if concurrency is None and rate is None:
        raise ConfigurationError(f"{where}[{key!r}]: give a concurrency, a rate or both")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)):
        raise ConfigurationError(f"{where}[{key!r}]: concurrency must be an integer >= 1, got {concurrency!r}")
    if concurrency is not None and concurrency < 1:
        raise ConfigurationError(f"{where}[{key!r}]: concurrency must be >= 1, got {concurrency!r}")
    per_second = parse_rate(rate, f"{where}[{key!r}]") if rate is not None else None
    return Limit(key, concurrency, per_second, str(rate) if rate is not None else None)


def parse_limits(value: object, where: str = "outbox_limits") -> tuple[Limit, ...]:
    """``{"email-worker": {"concurrency": 5, "rate": "100/m"}, "tenant:*": {...}}`` (or that mapping as JSON)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{where}: not a JSON object ({exc})") from None
    if isinstance(value, tuple) and all(isinstance(v, Limit) for v in value):
        return value
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{where}: expected a mapping of key -> {{concurrency, rate}}, got {value!r}")
    limits = []
    for key, spec in value.items():
        if not isinstance(spec, Mapping) or set(spec) - {"concurrency", "rate"}:
            raise ConfigurationError(f"{where}[{key!r}]: expected {{'concurrency': N, 'rate': '100/m'}}, got {spec!r}")
        limits.append(make_limit(key, spec.get("concurrency"), spec.get("rate"), where))
    return tuple(limits)


class Candidate(NamedTuple):
    """A due row the claim may take, with what its limits and its turn need."""

    id: Any
    target: str
    name: str
    tenant: str | None
    priority: int
    scheduled_at: Any


@dataclass
class Plan:
    """The limits in force, by scope, and whether tenants take turns."""

    limits: tuple[Limit, ...] = ()
    fair: bool = True
    #: bucket capacity in seconds of rate (one poll interval's worth of starts, at least one)
    burst_seconds: float = 1.0
    #: queues served in order (``outbox_strict_order``): in each, a target only while the earlier wait on nothing
    strict: tuple[tuple[str, ...], ...] = ()
    by_key: dict[str, Limit] = field(init=False)

    def __post_init__(self) -> None:
        self.by_key = {limit.key: limit for limit in self.limits}

    @property
    def limited(self) -> bool:
        return bool(self.limits)

    @property
    def ordered_targets(self) -> list[str]:
        """Every target of a strict order (those the claim must look at first)."""
        return sorted({target for group in self.strict for target in group})

    def held_by_order(self, waiting: set[str]) -> set[str]:
        """The targets a strict order holds back: in each group, those after the first target with work waiting."""
        held: set[str] = set()
        for group in self.strict:
            first = next((i for i, target in enumerate(group) if target in waiting), None)
            if first is not None:
                held.update(group[first + 1 :])
        return held

    @property
    def each_tenant(self) -> Limit | None:
        return self.by_key.get(EACH_TENANT)

    def keys_of(self, row: Any) -> list[str]:
        """The keys of the limits that hold for a row with a ``target``, ``name`` and ``tenant`` (a tenant's own
        limit wins over ``tenant:*``)."""
        keys = [k for k in (row.target, f"command:{row.name}") if k in self.by_key]
        if row.tenant is not None:
            own = f"tenant:{row.tenant}"
            if own in self.by_key or EACH_TENANT in self.by_key:
                keys.append(own)
        return keys

    def find(self, key: str) -> Limit | None:
        """The limit behind a key (``tenant:acme`` falls back on ``tenant:*``), if any."""
        found = self.by_key.get(key)
        if found is None and key.startswith("tenant:") and EACH_TENANT in self.by_key:
            found = self.by_key[EACH_TENANT]
        return found

    def limit_of(self, key: str) -> Limit:
        """The limit behind a key that has one."""
        found = self.find(key)
        if found is None:
            raise KeyError(key)
        return found

    def capacity(self, limit: Limit) -> float:
        """Most starts a rate bucket holds: one poll interval's worth, and at least one."""
        assert limit.per_second is not None
        return max(1.0, limit.per_second * self.burst_seconds)


def fair_order(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates in claim order: priority first, then tenants in turns, then due time."""
    turns: dict[tuple[int, str | None], int] = {}
    keyed = []
    for row in sorted(candidates, key=lambda r: (-r.priority, r.scheduled_at, str(r.id))):
        turn = turns.get((row.priority, row.tenant), 0)
        turns[(row.priority, row.tenant)] = turn + 1
        keyed.append(((-row.priority, turn, row.scheduled_at, str(row.id)), row))
    return [row for _, row in sorted(keyed, key=lambda pair: pair[0])]


def admit(
    candidates: Iterable[Candidate],
    plan: Plan,
    allowance: Mapping[str, int],
    limit: int,
    dispatched: Mapping[str, int] | None = None,
    max_in_flight: int = 0,
) -> list[Candidate]:
    """The candidates taken, in order, while every key they fall under has room; at most ``limit``.

    ``allowance``: room left per key (a key not in it has the room its limit gives from
    nothing in flight: a tenant not yet seen). ``dispatched``: per target, messages
    published and not yet started, held under ``max_in_flight`` (0: no cap).
    """
    room = dict(allowance)
    waiting = dict(dispatched or {})
    taken: list[Candidate] = []
    for row in candidates:
        if len(taken) >= limit:
            break
        keys = plan.keys_of(row)
        if max_in_flight and waiting.get(row.target, 0) >= max_in_flight:
            continue
        if any(room.setdefault(k, fresh_room(plan, k)) <= 0 for k in keys):
            continue
        for k in keys:
            room[k] -= 1
        waiting[row.target] = waiting.get(row.target, 0) + 1
        taken.append(row)
    return taken


def fresh_room(plan: Plan, key: str) -> int:
    """Room of a key with nothing in flight and a full bucket."""
    limit = plan.limit_of(key)
    room = [limit.concurrency] if limit.concurrency is not None else []
    if limit.per_second is not None:
        room.append(int(plan.capacity(limit)))
    return min(room)
