"""A local stand-in for Tray workflow URLs: checks signatures, records and shows what arrives.

Every path on the server is a separate "workflow": ``http://127.0.0.1:PORT/a`` and ``/b`` are
two URLs. Tests script its answers per path (statuses, delays, Retry-After); the quick start
runs it as ``python -m syncer.testing.tray_standin`` to show what a sync sends.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def tray_signature(body: bytes, secret: str) -> str:
    """X-Signature as a Tray workflow computes it: hex HMAC-SHA1 of the body, keyed by the
    secret. Written here with hmac and hashlib directly, not with the syncer's own signing, so
    that a wrong signature in the syncer cannot pass its own check."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha1).hexdigest()


@dataclass(frozen=True)
class Received:
    """One request as the stand-in saw it."""

    path: str
    body: bytes
    headers: dict[str, str]
    signature_ok: bool | None  # None: no secret configured on the stand-in
    status: int
    # Whether the workflow acted on it, answered in time or not (a reply may say it failed
    # after processing: a 5xx, or an answer too late for the sender's timeout).
    processed: bool = True

    @property
    def message(self) -> dict[str, Any]:
        """The JSON body."""
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Reply:
    """How to answer one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"ok":true}'
    delay_seconds: float = 0.0
    processed: bool | None = None  # default: processed unless the status is 4xx


Responder = Callable[[str, bytes], Reply]
_PRINTING = threading.Lock()


class _Server(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a sender opening 16 connections at once had
    # some of them dropped and retried by the kernel a second later.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A sender killed or cut off mid-request (the crash tests do it on purpose) resets its
        # connection; the default prints a traceback to whatever sys.stderr is at that moment,
        # which may be the captured output of a command a test is checking.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class TrayStandin:
    """An HTTP server on 127.0.0.1 that plays any number of Tray workflows."""

    def __init__(self, secret: str | None = None, port: int = 0, echo: bool = False) -> None:
        self.secret = secret
        self.echo = echo
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._responders: dict[str, Responder] = {}
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: without this, Nagle's algorithm and
            # the client's delayed ACK add ~40 ms to every keep-alive response.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                reply = standin._reply_for(self.path, body)
                signature = self.headers.get("X-Signature")
                ok = (
                    None
                    if standin.secret is None
                    else signature == tray_signature(body, standin.secret)
                )
                processed = (
                    reply.processed
                    if reply.processed is not None
                    else not 400 <= reply.status < 500
                )
                record = Received(
                    self.path, body, dict(self.headers.items()), ok, reply.status, processed
                )
                # Recorded on arrival: a workflow acts on a request before it answers, and an
                # answer that comes too late does not undo what it did.
                with standin._lock:
                    standin._received.append(record)
                if standin.echo:
                    standin._show(record)
                if reply.delay_seconds:
                    time.sleep(reply.delay_seconds)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    # The sender gave up waiting (a timeout): the request was still processed.
                    self.close_connection = True

        self._server = _Server(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _reply_for(self, path: str, body: bytes) -> Reply:
        with self._lock:
            responder = self._responders.get(path)
        return responder(path, body) if responder else Reply()

    @staticmethod
    def _show(record: Received) -> None:
        verdict = {None: "unsigned", True: "signature OK", False: "BAD SIGNATURE"}[
            record.signature_ok
        ]
        message = record.message
        if message.get("type") == "track":
            properties = message.get("properties", {})
            named = {"audience_key", "trait_key"}
            shown = {k: v for k, v in properties.items() if k not in named}
            what = f"track {json.dumps(message.get('event'))}"
        else:
            traits = message.get("traits", {})
            shown = {k: v for k, v in traits.items() if k != "email"}
            what = str(message.get("type"))
        line = (
            f"[tray {record.path}] {what} userId={message.get('userId')} "
            f"{json.dumps(shown)} ({verdict}) -> {record.status}\n"
        )
        with _PRINTING:  # one whole line at a time, whichever handler thread prints
            sys.stdout.write(line)
            sys.stdout.flush()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._server.server_address[1])

    def url(self, path: str = "/") -> str:
        """The URL of the workflow at ``path``."""
        return f"http://127.0.0.1:{self.port}{path}"

    def respond(self, path: str, responder: Responder | Reply) -> None:
        """Answer requests to ``path`` with a fixed reply or a function of the body."""
        with self._lock:
            if isinstance(responder, Reply):
                fixed = responder
                self._responders[path] = lambda _path, _body: fixed
            else:
                self._responders[path] = responder

    def received(self, path: str | None = None) -> list[Received]:
        """Every request received (at ``path``), in arrival order."""
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def clear(self) -> None:
        """Forget what was received."""
        with self._lock:
            self._received.clear()

    def start(self) -> TrayStandin:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> TrayStandin:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def main() -> None:
    """Run a stand-in in the foreground, printing each event it receives."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--secret", default=None, help="check X-Signature against this secret")
    parser.add_argument("--quiet", action="store_true", help="do not print each request")
    arguments = parser.parse_args()
    standin = TrayStandin(secret=arguments.secret, port=arguments.port, echo=not arguments.quiet)
    print(f"tray stand-in listening on {standin.url()}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        standin._server.serve_forever()


if __name__ == "__main__":
    main()
