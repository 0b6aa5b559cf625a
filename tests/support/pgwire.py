"""A loopback TCP proxy in front of PostgreSQL that counts the round trips of its clients.

A client waits for PostgreSQL once per ``Sync`` (the end of an extended-protocol exchange
or of a pipeline) and once per simple ``Query``: each is answered by ``ReadyForQuery``.
The proxy reads the protocol's framing on the way from the client (a startup packet,
then a type byte and a length per message) and counts those two message types before
passing them on, so a count read after the client's call returned includes its waits.
Clients must connect without TLS or GSS encryption (``sslmode=disable&gssencmode=disable``,
as :attr:`RoundTrips.url` does): the proxy reads the bytes as they travel.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from types import TracebackType

#: Messages a client sends that PostgreSQL answers with ReadyForQuery: a wait each.
WAITS = frozenset(b"SQ")
#: Startup codes answered by one byte, after which the client sends its startup packet again.
_NEGOTIATIONS = {80877103, 80877104}  # SSLRequest, GSSENCRequest


class RoundTrips:
    """Listens on 127.0.0.1 (a port of its own) and relays to ``host:port``; :attr:`count` is the waits so far."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5432) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._count = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="pgwire-accept", daemon=True).start()

    def url(self, database: str = "test", user: str = "postgres") -> str:
        """A SQLAlchemy URL to PostgreSQL through this proxy."""
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{database}?sslmode=disable&gssencmode=disable"

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def reset(self) -> None:
        with self._lock:
            self._count = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> RoundTrips:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            threading.Thread(target=self._from_client, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _from_client(self, client: socket.socket, server: socket.socket) -> None:
        buffer = b""
        started = False
        for data in _chunks(client):
            buffer += data
            waits, buffer, started = _frames(buffer, started)
            if waits:
                with self._lock:
                    self._count += waits
            with contextlib.suppress(OSError):
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        for data in _chunks(source):
            with contextlib.suppress(OSError):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _chunks(sock: socket.socket) -> Iterator[bytes]:
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        yield data


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
