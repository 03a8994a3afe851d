"""The daemon's HTTP application (WSGI): the status page, the user lookup, ``/metrics``,
``/healthz`` and the login form.

Read-only: GET and HEAD everywhere, POST only to /login (which only sets a cookie). Pages are
rendered by Jinja2 with autoescaping on, under a Content-Security-Policy that allows no script
at all, so data from upstream (user ids, names, values, error texts) can never run in a browser.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlencode, urlsplit
from wsgiref.types import StartResponse, WSGIEnvironment

import structlog
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from sqlalchemy.exc import SQLAlchemyError

from syncer.core.payload import MAX_USER_ID_LENGTH
from syncer.settings import Settings
from syncer.store import Store
from syncer.store.audiences import AudienceRow
from syncer.store.status import RUN_COUNTS, StatusStore
from syncer.web.auth import TokenAuth
from syncer.web.health import check, describe_seconds
from syncer.web.metrics import CONTENT_TYPE, SyncerMetrics, unix_seconds
from syncer.web.urls import ConfiguredUrls
from syncer.web.views import status_page, user_timeline

log = structlog.get_logger("syncer.web")

# No script may run, no style or image may load from elsewhere, no one may frame the pages.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_COMMON_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
]
HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
PAGES = frozenset({"/", "/user"})
MAX_LOGIN_BODY = 4096


@dataclass
class Response:
    """What one request is answered with."""

    status: HTTPStatus
    body: bytes = b""
    content_type: str = TEXT
    headers: list[tuple[str, str]] = field(default_factory=list)


def text(status: HTTPStatus, body: str, **headers: str) -> Response:
    """A plain-text answer."""
    return Response(status, body.encode("utf-8"), TEXT, list(headers.items()))


def redirect(location: str, *headers: tuple[str, str]) -> Response:
    """A 303 See Other to a path of this server."""
    return Response(HTTPStatus.SEE_OTHER, b"", TEXT, [("Location", location), *headers])


def safe_next(target: str) -> str:
    """Where to go after logging in: one of this server's pages with its query, else "/"
    (never another site: no scheme, no host, no header injection)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.path not in PAGES:
        return "/"
    query = urlencode(parse_qsl(parts.query, keep_blank_values=True))
    return quote(parts.path) + (f"?{query}" if query else "")


def when(moment: datetime | str | None) -> str:
    """A moment for the page: stored naive UTC datetimes, or explain's ISO text."""
    if moment is None:
        return ""
    if isinstance(moment, str):
        return moment.replace("T", " ")
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def shown(value: Any) -> str:
    """A recorded value for the page: true/false for audiences, a trait's JSON text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _templates() -> Environment:
    environment = Environment(
        loader=PackageLoader("syncer.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(when=when, shown=shown, seconds=describe_seconds)
    return environment


class StatusApp:
    """The WSGI application; ``clock`` gives the current naive UTC time."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        status: StatusStore,
        metrics: SyncerMetrics,
        defined: Sequence[AudienceRow],
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.store = store
        self.status = status
        self.metrics = metrics
        self.defined = list(defined)
        self.clock = clock
        self.urls = ConfiguredUrls(settings.tray.urls)
        self.auth = TokenAuth(settings.http.token_text)
        self.templates = _templates()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        path = str(environ.get("PATH_INFO") or "/")
        try:
            response = self._respond(method, path, environ)
        except SQLAlchemyError as error:
            log.warning("http_database_error", path=path, error=type(error).__name__)
            response = text(HTTPStatus.SERVICE_UNAVAILABLE, "the database is unavailable\n")
        except Exception as error:  # one request's failure must not take the server down
            log.error("http_internal_error", path=path, error=f"{type(error).__name__}"[:200])
            response = text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *_COMMON_HEADERS,
            *response.headers,
        ]
        if response.content_type == HTML:
            headers.append(("Content-Security-Policy", CONTENT_SECURITY_POLICY))
        start_response(f"{response.status.value} {response.status.phrase}", headers)
        # HEAD: the headers of the GET, no body.
        return [b"" if method == "HEAD" else response.body]

    def _respond(self, method: str, path: str, environ: WSGIEnvironment) -> Response:
        if path == "/login":
            if method not in ("GET", "HEAD", "POST"):
                return text(HTTPStatus.METHOD_NOT_ALLOWED, "GET or POST\n", Allow="GET, HEAD, POST")
            return self._login(method, environ)
        if method not in ("GET", "HEAD"):
            return text(HTTPStatus.METHOD_NOT_ALLOWED, "read-only: GET\n", Allow="GET, HEAD")
        if path == "/healthz":
            return self._health(environ)
        if path not in PAGES and path != "/metrics":
            return text(HTTPStatus.NOT_FOUND, "not found\n")
        if not self.auth.allows(environ, self._epoch()):
            if path in PAGES:
                query = str(environ.get("QUERY_STRING", ""))
                target = path + (f"?{query}" if query else "")
                return redirect("/login?" + urlencode({"next": safe_next(target)}))
            return text(
                HTTPStatus.UNAUTHORIZED,
                "a token is required: Authorization: Bearer <token>\n",
                **{"WWW-Authenticate": 'Bearer realm="syncer"'},
            )
        if path == "/metrics":
            return Response(HTTPStatus.OK, self.metrics.exposition(), CONTENT_TYPE)
        if path == "/user":
            return self._user(environ)
        return self._index()

    def _epoch(self) -> float:
        return unix_seconds(self.clock())

    def _page(self, template: str, status: HTTPStatus = HTTPStatus.OK, **context: Any) -> Response:
        body = self.templates.get_template(template).render(
            auth=self.auth.enabled, now=self.clock(), **context
        )
        return Response(status, body.encode("utf-8"), HTML)

    def _health(self, environ: WSGIEnvironment) -> Response:
        now = self.clock()
        try:
            reasons = check(
                self.status.overview(),
                self.urls.canonical,
                now,
                self.settings.http.max_backlog_age_seconds,
            )
        except SQLAlchemyError as error:
            log.warning("health_database_error", error=type(error).__name__)
            reasons = [f"the database cannot be read ({type(error).__name__})"]
        status = HTTPStatus.SERVICE_UNAVAILABLE if reasons else HTTPStatus.OK
        if "application/json" in str(environ.get("HTTP_ACCEPT", "")):
            body = {"status": "failing" if reasons else "ok", "reasons": reasons}
            return Response(status, json.dumps(body).encode(), "application/json")
        return text(status, "\n".join(reasons or ["ok"]) + "\n")

    def _index(self) -> Response:
        page = status_page(
            self.store,
            self.status,
            self.urls,
            self.defined,
            self.clock(),
            self.settings.http.max_backlog_age_seconds,
        )
        return self._page("index.html", page=page, run_counts=RUN_COUNTS)

    def _user(self, environ: WSGIEnvironment) -> Response:
        query = parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
        user_id = query.get("user", [""])[0]
        if not user_id:
            return self._page("user.html", user_id="", timeline=None)
        if len(user_id) > MAX_USER_ID_LENGTH:
            return self._page(
                "user.html",
                HTTPStatus.BAD_REQUEST,
                user_id="",
                timeline=None,
                problem=f"a user id is at most {MAX_USER_ID_LENGTH} characters",
            )
        timeline = user_timeline(self.store, self.defined, user_id, self.urls)
        return self._page("user.html", user_id=user_id, timeline=timeline)

    def _login(self, method: str, environ: WSGIEnvironment) -> Response:
        query = parse_qs(str(environ.get("QUERY_STRING", "")))
        if not self.auth.enabled:
            return redirect(safe_next(query.get("next", ["/"])[0]))
        if method != "POST":
            return self._page("login.html", next=safe_next(query.get("next", ["/"])[0]))
        form = parse_qs(_read_body(environ).decode("utf-8", "replace"))
        target = safe_next(form.get("next", ["/"])[0])
        if self.auth.token_matches(form.get("token", [""])[0]):
            secure = str(environ.get("HTTP_X_FORWARDED_PROTO", "")).lower() == "https" or (
                environ.get("wsgi.url_scheme") == "https"
            )
            cookie = self.auth.set_cookie_header(self._epoch(), secure)
            log.info("http_login", client=environ.get("REMOTE_ADDR"))
            return redirect(target, ("Set-Cookie", cookie))
        log.warning("http_login_failed", client=environ.get("REMOTE_ADDR"))
        return self._page(
            "login.html", HTTPStatus.UNAUTHORIZED, next=target, problem="That is not the token."
        )


def _read_body(environ: WSGIEnvironment) -> bytes:
    try:
        length = int(str(environ.get("CONTENT_LENGTH") or 0))
    except ValueError:
        length = 0
    if length <= 0:
        return b""
    stream = environ["wsgi.input"]
    body: bytes = stream.read(min(length, MAX_LOGIN_BODY))
    return body
