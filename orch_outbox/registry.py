"""Which Outbox is attached to which Celery app (one per app)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from celery import Celery

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .outbox import Outbox

_BY_APP: weakref.WeakKeyDictionary[Celery, Outbox] = weakref.WeakKeyDictionary()


def attach(app: Celery, outbox: Outbox) -> None:
    """Attach ``outbox`` to ``app``; an app has one outbox."""
    if app in _BY_APP:
        raise ConfigurationError(f"the Celery app {app.main!r} already has an Outbox")
    _BY_APP[app] = outbox


def outbox_of(app: Celery) -> Outbox:
    """The Outbox attached to a Celery app."""
    try:
        return _BY_APP[app]
    except KeyError:
        raise ConfigurationError(f"no Outbox is attached to the Celery app {app.main!r}") from None
