"""The listening relay: relays as soon as a pushing transaction commits (LISTEN/NOTIFY), polling as the fallback."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import StoreUnavailable

if TYPE_CHECKING:
    from .settings import Settings
    from .store import Store

log = logging.getLogger("orch_outbox.relay")


class ListeningRelay:
    """Relays as soon as a transaction that pushed commands commits; polls as the fallback.

    On PostgreSQL an INSERT trigger NOTIFYs on commit; this loop waits for that signal
    (or ``outbox_poll_interval`` at most) and then relays, and runs the rescuer every
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
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Listen and relay until ``stop`` is set."""
        backoff = 0.2
        next_rescue = 0.0
        while not self.stop.is_set():
            try:
                with self.store.listen() as wait:
                    self.listening.set()
                    backoff = 0.2
                    while not self.stop.is_set():
                        self.relay_once()
                        if time.monotonic() >= next_rescue:
                            self.rescue_once()
                            next_rescue = time.monotonic() + self.settings.rescue_interval
                        self.passes += 1
                        wait(self.settings.poll_interval)
            except StoreUnavailable as exc:
                log.warning("listening relay: %s; reconnecting in %.1fs", exc, backoff)
            except Exception:
                log.exception("listening relay failed; restarting in %.1fs", backoff)
            self.listening.clear()
            self.stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def start(self) -> threading.Thread:
        """Run in a daemon thread; returns it."""
        self._thread = threading.Thread(target=self.run, name="orch-outbox-relay", daemon=True)
        self._thread.start()
        return self._thread

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop and wait for its thread."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
