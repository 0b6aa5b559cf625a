"""The listening relay: relays as soon as a pushing transaction commits (LISTEN/NOTIFY), polling as the fallback."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import StoreUnavailable

if TYPE_CHECKING:
    from .settings import Settings
    from .store import Store

log = logging.getLogger("orch_outbox.relay")

#: Commands a second above which the relay is busy: it polls every ``BUSY_POLL`` seconds and pushes do not notify.
BUSY_RATE = 500
#: Seconds a busy relay waits before it looks again, without notifications.
BUSY_POLL = 0.02
#: Seconds over which the rate of published commands is measured.
RATE_WINDOW = 0.25
#: Seconds an idle mark holds unless renewed (a relay that died is notified for that long at most).
IDLE_MARK = 30.0


class ListeningRelay:
    """Relays as soon as a transaction that pushed commands commits; polls as the fallback.

    On PostgreSQL an INSERT trigger NOTIFYs on commit while a relay is marked idle; this
    loop marks itself idle, waits for that signal (or ``outbox_poll_interval`` at most) and
    then relays; while commands arrive faster than ``BUSY_RATE`` a second it stays busy
    and looks again every ``BUSY_POLL`` seconds, so under load pushes do not notify (a notifying transaction
    takes a cluster-wide lock at commit). It runs the rescuer every
    ``outbox_rescue_interval``. When the listening connection fails it reconnects with
    backoff; meanwhile beat's polling relay keeps commands flowing.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        relay_once: Callable[[], object],
        rescue_once: Callable[[], object],
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.relay_once = relay_once
        self.rescue_once = rescue_once
        self.stop = stop or threading.Event()
        self.listening = threading.Event()
        #: relay passes completed since start (tests wait on it instead of sleeping).
        self.passes = 0
        #: this relay's row in ``{prefix}listeners``
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._next_rescue = 0.0
        #: (monotonic time, commands published) of the recent passes
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Listen and relay until ``stop`` is set."""
        backoff = 0.2
        try:
            while not self.stop.is_set():
                try:
                    if self.settings.notify == "never":
                        self._poll()
                    else:
                        with self.store.listen() as wait:
                            self.listening.set()
                            backoff = 0.2
                            self._listen(wait)
                except StoreUnavailable as exc:
                    log.warning("listening relay: %s; reconnecting in %.1fs", exc, backoff)
                except Exception:
                    log.exception("listening relay failed; restarting in %.1fs", backoff)
                self.listening.clear()
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        finally:
            with contextlib.suppress(Exception):
                self.store.forget_listener(self.name)

    def _pass(self) -> int:
        published = self.relay_once()
        if time.monotonic() >= self._next_rescue:
            self.rescue_once()
            self._next_rescue = time.monotonic() + self.settings.rescue_interval
        self.passes += 1
        return published if isinstance(published, int) else 0

    def _listen(self, wait: Callable[[float], bool]) -> None:
        """Relay; while commands arrive faster than ``BUSY_RATE`` a second, this relay is marked busy (pushes do not
        notify it) and looks again every ``BUSY_POLL`` seconds; below that rate it stays marked idle (every push
        notifies it at once) and waits for a notification, ``outbox_poll_interval`` at most."""
        poll = self.settings.poll_interval
        always = self.settings.notify == "always"
        idle_until = 0.0  # until when this relay's idle mark holds (monotonic); 0: marked busy or not at all
        while not self.stop.is_set():
            published = self._pass()
            if not always and self._busy(published):
                if idle_until:
                    self.store.mark_busy(self.name)
                    idle_until = 0.0
                wait(BUSY_POLL)
                continue
            if time.monotonic() > idle_until - poll - 1.0:  # mark (or renew the mark) before it runs out
                was_busy = not idle_until
                self.store.mark_idle(self.name, IDLE_MARK)
                idle_until = time.monotonic() + IDLE_MARK
                if was_busy and self._pass():  # a push that committed before it could see this relay idle
                    continue
            wait(poll)

    def _busy(self, published: int) -> bool:
        """True while the rate of commands published over the last ``RATE_WINDOW`` seconds is above ``BUSY_RATE``."""
        now = time.monotonic()
        self._window.append((now, published))
        while self._window and self._window[0][0] < now - RATE_WINDOW:
            self._window.popleft()
        return published > 0 and sum(n for _, n in self._window) > BUSY_RATE * RATE_WINDOW

    def _poll(self) -> None:
        """``outbox_notify = "never"``: relay every poll interval, with jitter (relays spread their claims)."""
        self.listening.set()
        while not self.stop.is_set():
            self._pass()
            self.stop.wait(self.settings.poll_interval * random.uniform(0.8, 1.2))

    def start(self) -> threading.Thread:
        """Run in a daemon thread; returns it."""
        self._thread = threading.Thread(target=self.run, name="orch-outbox-relay", daemon=True)
        self._thread.start()
        return self._thread

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop and wait for its thread (a notification wakes it from its wait)."""
        self.stop.set()
        if self._thread is not None:
            if self.listening.is_set() and self.settings.notify != "never":
                with contextlib.suppress(Exception):
                    self.store.wake_listeners()
            self._thread.join(timeout)
