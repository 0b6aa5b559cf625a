"""A small threaded TCP proxy that simulates a server going away, without touching the server.

The project under test connects to ``127.0.0.1:<proxy.port>`` instead of the real
PostgreSQL or broker; the proxy forwards every byte to the real server. Other users of
the shared servers are never disturbed:

- :meth:`Proxy.cut` closes every live connection in both directions (abortively: the
  peer sees a reset or an EOF, as when a server restarts or a network path dies);
- :meth:`Proxy.refuse` makes every new connection fail at once (accepted, then reset
  before a byte is forwarded) until :meth:`Proxy.restore`.

One accept thread plus two pump threads per connection; the test process owns them all
and :meth:`Proxy.close` stops everything.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

#: SO_LINGER on, timeout 0: close() sends a reset instead of a graceful FIN.
_ABORT = struct.pack("ii", 1, 0)


def _abort(sock: socket.socket) -> None:
    """Close a socket abortively; wakes any thread blocked reading it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One proxied connection: the client's socket and ours to the real server."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _abort(self.client)
        _abort(self.upstream)


class Proxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; can cut and refuse connections."""

    def __init__(self, upstream_host: str, upstream_port: int, name: str = "proxy") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._refusing = False
        self._closed = False
        #: counters a test can assert on (connections forwarded, refused, cut).
        self.accepted = 0
        self.refused = 0
        self.cut_count = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._thread.start()

    # -- control ------------------------------------------------------------------------

    def cut(self) -> int:
        """Close every live connection in both directions; returns how many were cut."""
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
            self.cut_count += len(pairs)
        for pair in pairs:
            pair.close()
        return len(pairs)

    def refuse(self) -> None:
        """Make every new connection fail immediately, until :meth:`restore`."""
        with self._lock:
            self._refusing = True

    def restore(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._refusing = False

    def down(self) -> int:
        """The server "goes down": refuse new connections, then cut the live ones."""
        self.refuse()
        return self.cut()

    @property
    def active(self) -> int:
        """How many connections are being forwarded now."""
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        """Stop listening and cut everything."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close() alone would not)
        with contextlib.suppress(OSError):
            self._server.close()
        self.cut()
        self._thread.join(5)

    # -- forwarding ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            with self._lock:
                closed, refusing = self._closed, self._refusing
            if closed:
                _abort(client)
                return
            if refusing:
                with self._lock:
                    self.refused += 1
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _abort(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self._lock:
                if self._refusing or self._closed:  # refused while we were connecting
                    self.refused += 1
                    pair.close()
                    continue
                self._pairs.add(pair)
                self.accepted += 1
            for src, dst, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(
                    target=self._pump, args=(pair, src, dst), name=f"{self.name}-{direction}", daemon=True
                ).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._passing(pair, src is pair.client, data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._pairs.discard(pair)
            pair.close()

    def _passing(self, pair: _Pair, from_client: bool, data: bytes) -> None:
        """Bytes on their way, before they are passed on (a subclass may read them)."""

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
