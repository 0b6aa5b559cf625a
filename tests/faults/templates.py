"""The scripts a fault project's folder holds besides its config, as text (written by ``harness.FaultProject``).

- ``FAULT_COMMANDS`` — ``fault_commands.py``: the commands of ``commands.py``, declared on the ready app;
- ``RELAY_CRASH`` — ``relay_crash.py``: a relay process that dies before or after publishing its first batch;
- ``PUSH_SCRIPT`` — ``push.py``: the user's web process, pushing in its own transactions;
- ``SKEW_SITECUSTOMIZE`` — a ``sitecustomize.py`` that shifts a process's wall clock.
"""

FAULT_COMMANDS = '''\
"""Commands of the fault project, declared on the ready app (see fault_commands_impl.declare)."""

from orch_outbox import command

from fault_commands_impl import declare

QUEUE = {queue!r}
EFFECTS_URL = {effects_url!r}
PREFIX = {prefix!r}

globals().update(declare(command, QUEUE, EFFECTS_URL, PREFIX))
'''

RELAY_CRASH = '''\
"""A relay process that dies (os._exit(137), like kill -9) before or after publishing its first batch."""

import json
import os
import sys

from orch_outbox import relay as relay_module
from orch_outbox.default import default_outbox

when = sys.argv[1]
original = relay_module.Relay.publish


def crash_before(self, batch):
    print(json.dumps([[str(d.id), d.attempt] for d in batch]), flush=True)
    os._exit(137)


def crash_after(self, batch):
    sent = original(self, batch)
    print(json.dumps([[str(d.id), d.attempt] for d in batch[:sent]]), flush=True)
    os._exit(137)


relay_module.Relay.publish = crash_before if when == "before" else crash_after
default_outbox().relay_once()
print("nothing was due", flush=True)
sys.exit(3)
'''

PUSH_SCRIPT = '''\
"""The user's web process: pushes in its own transactions (the broker plays no part); prints the ids."""

import json
import sys
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

import fault_commands as c

engine = sa.create_engine(sys.argv[1])
count = int(sys.argv[2])
out = {"committed": [], "rolled_back": [], "seconds": []}
for i in range(count):
    began = time.monotonic()
    with Session(engine) as session, session.begin():
        out["committed"].append(str(c.work.push(session, i)))
    out["seconds"].append(time.monotonic() - began)
with Session(engine) as session:
    out["rolled_back"].append(str(c.work.push(session, -1)))
    session.rollback()
engine.dispose()
print(json.dumps(out))
'''

SKEW_SITECUSTOMIZE = '''\
"""Shift this process's wall clock by {offset} s: time.time(), time.time_ns() and datetime.now()/utcnow()."""

import datetime as _dt
import time as _time

OFFSET = {offset!r}
_real_time, _real_time_ns, _Real = _time.time, _time.time_ns, _dt.datetime


def _time_skewed():
    return _real_time() + OFFSET


def _time_ns_skewed():
    return _real_time_ns() + int(OFFSET * 1e9)


class _Meta(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, _Real)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, _Real)


class _SkewedDatetime(_Real, metaclass=_Meta):
    @classmethod
    def now(cls, tz=None):
        return _Real.now(tz) + _dt.timedelta(seconds=OFFSET)

    @classmethod
    def utcnow(cls):
        return _Real.now(_dt.timezone.utc).replace(tzinfo=None) + _dt.timedelta(seconds=OFFSET)


_time.time = _time_skewed
_time.time_ns = _time_ns_skewed
_dt.datetime = _SkewedDatetime
'''
