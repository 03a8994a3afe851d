"""The daemon's HTTP server: the standard library's WSGI server, a thread per request, run on
a background thread beside the scheduler."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog

from syncer.errors import ConfigError
from syncer.settings import Settings
from syncer.store import Store
from syncer.store.audiences import AudienceRow
from syncer.store.sql import utcnow
from syncer.store.status import StatusStore
from syncer.web.app import StatusApp
from syncer.web.metrics import SyncerMetrics
from syncer.web.urls import ConfiguredUrls

if TYPE_CHECKING:
    from syncer.sync.reports import SyncReport

log = structlog.get_logger("syncer.web")

# A client that sends nothing for this long is dropped, so that it cannot hold a thread.
REQUEST_TIMEOUT_SECONDS = 30


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_SECONDS
    # The Server header names no versions.
    server_version = "syncer"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request to stderr, unstructured. Requests are logged at
        # DEBUG, by path only: a query may hold a user id, and headers may hold the token.
        log.debug("http_request", request=self.command, path=self.path.split("?", 1)[0])

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("http_bad_request", client=self.client_address[0])


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request in progress never holds up the daemon's exit
    allow_reuse_address = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host's name up in DNS (socket.getfqdn), which can
        # hang for seconds on a machine without DNS; the name is only used for SERVER_NAME.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()


def _server_class(host: str) -> type[_ThreadingServer]:
    try:
        family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise ConfigError(f"[http] host: cannot resolve {host!r}: {error.strerror}") from None

    class Server(_ThreadingServer):
        address_family = family

    return Server


class StatusServer:
    """Serves the status page, ``/metrics`` and ``/healthz`` until stopped."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        holder: str,
        defined: list[AudienceRow],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        urls = ConfiguredUrls(settings.tray.urls)
        status = StatusStore(store.engine)
        self.metrics = SyncerMetrics(status, urls, holder, clock)
        self.app = StatusApp(settings, store, status, self.metrics, defined, clock)
        self._server: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose when ``[http] port`` is 0)."""
        assert self._server is not None
        return self._server.server_port

    def start(self) -> int:
        """Listen and serve on a background thread; return the port. Raises ConfigError
        when the address cannot be listened on (in use, or not this machine's)."""
        http = self.settings.http
        assert http.port is not None
        try:
            server = _server_class(http.host)((http.host, http.port), _Handler)
        except OSError as error:
            raise ConfigError(
                f"[http] cannot listen on {http.host}:{http.port}: {error.strerror or error}"
            ) from None
        server.set_app(self.app)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="syncer-http"
        )
        self._thread.daemon = True
        self._thread.start()
        log.info(
            "http_listening",
            host=http.host,
            port=self.port,
            token_required=self.app.auth.enabled,
        )
        return self.port

    def record_run(self, report: SyncReport | None) -> None:
        """Count a finished run in the metrics (see SyncerMetrics.record_run). A failure is
        logged, never raised: the schedule goes on."""
        try:
            self.metrics.record_run(report)
        except Exception as error:
            log.warning("metrics_not_recorded", error=f"{type(error).__name__}"[:200])

    def stop(self) -> None:
        """Stop serving and close the socket (requests in progress are not waited for)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        log.info("http_stopped")
