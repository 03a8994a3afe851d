"""The token that guards the HTTP server: a Bearer header, or a session cookie from /login.

The cookie does not hold the token: it holds an expiry and an HMAC of it keyed by the token,
so it lapses on its own and stops working when the token changes. Every comparison is
constant-time (hmac.compare_digest). The token is never logged, rendered nor echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any

COOKIE_NAME = "syncer_session"
SESSION_SECONDS = 12 * 3600


class TokenAuth:
    """Decides whether a request may see anything but /healthz."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode("utf-8") if token else None

    @property
    def enabled(self) -> bool:
        """Whether a token is asked for at all (``[http] token`` is set)."""
        return self._token is not None

    def token_matches(self, presented: str) -> bool:
        """Whether ``presented`` is the token."""
        if self._token is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), self._token)

    def _signature(self, expires: int) -> str:
        assert self._token is not None
        message = f"syncer-session:{expires}".encode()
        return hmac.new(self._token, message, hashlib.sha256).hexdigest()

    def session_value(self, now: float) -> str:
        """A cookie value good for SESSION_SECONDS from ``now`` (epoch seconds)."""
        expires = int(now) + SESSION_SECONDS
        return f"{expires}.{self._signature(expires)}"

    def session_valid(self, value: str, now: float) -> bool:
        """Whether a cookie value is one this token signed and has not expired at ``now``."""
        if self._token is None:
            return False
        expires_text, _, signature = value.partition(".")
        if not expires_text.isdigit() or int(expires_text) <= now:
            return False
        return hmac.compare_digest(signature.encode(), self._signature(int(expires_text)).encode())

    def set_cookie_header(self, now: float, secure: bool) -> str:
        """The Set-Cookie header of a new session: HttpOnly, SameSite=Strict, and Secure when
        the page was reached over HTTPS (a browser drops a Secure cookie sent over plain HTTP
        to another host)."""
        attributes = f"Max-Age={SESSION_SECONDS}; Path=/; HttpOnly; SameSite=Strict"
        return f"{COOKIE_NAME}={self.session_value(now)}; {attributes}" + (
            "; Secure" if secure else ""
        )

    def allows(self, environ: Mapping[str, Any], now: float) -> bool:
        """Whether the request carries the token (Authorization: Bearer) or a valid session
        cookie; always true when no token is set."""
        if self._token is None:
            return True
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(credentials.strip()):
            return True
        cookie = session_cookie(environ)
        return cookie is not None and self.session_valid(cookie, now)


def session_cookie(environ: Mapping[str, Any]) -> str | None:
    """The session cookie's value in a request, if any."""
    raw = str(environ.get("HTTP_COOKIE", ""))
    if not raw:
        return None
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(raw)
    except CookieError:  # a malformed header from another site's cookies: no session
        return None
    morsel = cookies.get(COOKIE_NAME)
    return None if morsel is None else morsel.value
