"""A TCP proxy on 127.0.0.1 that a test can cut off from the database and connect again.

A process whose database URL names the proxy's port reaches PostgreSQL through it. The test
then plays a network fault without touching the shared server:

- ``cut()``: every connection through the proxy is reset at once and new ones are reset as soon
  as they arrive (the database is "refused": every statement fails at once);
- ``stall()``: the connections stay open but no byte gets through in either direction, and new
  connections are accepted and left waiting (the database "stops answering": statements hang);
- ``restore()``: new connections work again; stalled ones resume where they stopped (a
  partition that heals), reset ones are gone for good.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

_CHUNK = 65536
_POLL_SECONDS = 0.05


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), so the peer learns at once, not after a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One client connection and its connection to the target, pumped both ways."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self._proxy = proxy
        self._sockets = (client, upstream)
        self._closed = threading.Event()

    def start(self) -> None:
        client, upstream = self._sockets
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    break
                # While stalled, what was read is held back until the proxy is restored.
                while not self._proxy._flowing.wait(_POLL_SECONDS):
                    if self._closed.is_set():
                        return
                if self._closed.is_set():
                    return
                target.sendall(data)
        except OSError:
            pass
        finally:
            self.close()

    def close(self, reset: bool = False) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for sock in self._sockets:
            if reset:
                _reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        self._proxy._forget(self)


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port``; see the module doc."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5432) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._refusing = False
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_forever, daemon=True)

    @property
    def port(self) -> int:
        """The port clients connect to."""
        return int(self._listener.getsockname()[1])

    def url_for(self, database_url: str) -> str:
        """``database_url`` (on the target host and port) rewritten to go through the proxy."""
        from sqlalchemy.engine import make_url

        return (
            make_url(database_url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    @property
    def connections(self) -> int:
        """How many connections are open through the proxy now."""
        with self._lock:
            return len(self._links)

    def _accept_forever(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                refusing = self._refusing or self._stopped
            if refusing:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            link = _Link(self, client, upstream)
            with self._lock:
                if self._refusing or self._stopped:
                    refused = True
                else:
                    self._links.add(link)
                    refused = False
            if refused:
                link.close(reset=True)
            else:
                link.start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _take_links(self) -> list[_Link]:
        with self._lock:
            links = list(self._links)
            self._links.clear()
        return links

    def cut(self) -> None:
        """Reset every connection now and every new one until :meth:`restore`."""
        with self._lock:
            self._refusing = True
        for link in self._take_links():
            link.close(reset=True)

    def stall(self) -> None:
        """Let no byte through, either way, until :meth:`restore`; connections stay open."""
        self._flowing.clear()

    def restore(self) -> None:
        """Accept and forward again; stalled connections resume."""
        with self._lock:
            self._refusing = False
        self._flowing.set()

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        with self._lock:
            self._stopped = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._flowing.set()
        for link in self._take_links():
            link.close(reset=True)
        self._thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()
