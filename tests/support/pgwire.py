"""A loopback proxy in front of PostgreSQL that counts the round trips of its clients.

A client waits for PostgreSQL once per ``Sync`` (the end of an extended-protocol exchange
or of a pipeline) and once per simple ``Query``: each is answered by ``ReadyForQuery``.
:class:`RoundTrips` (a :class:`support.proxy.Proxy`) reads the protocol's framing on the
way from the client (a startup packet, then a type byte and a length per message) and
counts those two message types before passing them on, so a count read after the
client's call returned includes its waits. Clients must connect without TLS or GSS
encryption (``sslmode=disable&gssencmode=disable``, as :meth:`RoundTrips.url` does): the
proxy reads the bytes as they travel.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

from support.proxy import Proxy

#: Messages a client sends that PostgreSQL answers with ReadyForQuery: a wait each.
WAITS = frozenset(b"SQ")
#: Startup codes answered by one byte, after which the client sends its startup packet again.
_NEGOTIATIONS = {80877103, 80877104}  # SSLRequest, GSSENCRequest


class RoundTrips(Proxy):
    """Relays 127.0.0.1 (a port of its own) to ``host:port``; :attr:`count` is its clients' waits so far."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5432) -> None:
        self._counted = threading.Lock()
        self._count = 0
        self._streams: dict[Any, tuple[bytes, bool]] = {}  # per connection: bytes not framed yet, startup over
        super().__init__(host, port, name="pgwire")

    def url(self, database: str = "test", user: str = "postgres") -> str:
        """A SQLAlchemy URL to PostgreSQL through this proxy."""
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{database}?sslmode=disable&gssencmode=disable"

    @property
    def count(self) -> int:
        with self._counted:
            return self._count

    def reset(self) -> None:
        with self._counted:
            self._count = 0

    def _passing(self, pair: Any, from_client: bool, data: bytes) -> None:
        if not from_client:
            return
        buffer, started = self._streams.get(pair, (b"", False))  # one thread reads each client: no race here
        waits, buffer, started = _frames(buffer + data, started)
        self._streams[pair] = (buffer, started)
        if waits:
            with self._counted:
                self._count += waits


def _frames(buffer: bytes, started: bool) -> tuple[int, bytes, bool]:
    """Count the waits among the whole messages at the head of ``buffer``; the rest, and whether startup is over."""
    waits = 0
    while True:
        if not started:
            if len(buffer) < 8:
                return waits, buffer, started
            length, code = struct.unpack("!ii", buffer[:8])
            if len(buffer) < length:
                return waits, buffer, started
            buffer, started = buffer[length:], code not in _NEGOTIATIONS
            continue
        if len(buffer) < 5:
            return waits, buffer, started
        kind, length = buffer[0], struct.unpack("!i", buffer[1:5])[0]
        if len(buffer) < 1 + length:
            return waits, buffer, started
        waits += kind in WAITS
        buffer = buffer[1 + length :]
