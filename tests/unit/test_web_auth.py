"""The HTTP server's token (:mod:`syncer.web.auth`) and where a login may send a browser
(:func:`syncer.web.app.safe_next`)."""

from __future__ import annotations

import pytest

from syncer.web.app import safe_next
from syncer.web.auth import COOKIE_NAME, SESSION_SECONDS, TokenAuth

TOKEN = "a-token-of-sixteen-or-more"
NOW = 1_750_000_000.0


def test_without_a_token_everything_is_allowed_and_nothing_matches() -> None:
    auth = TokenAuth(None)
    assert not auth.enabled
    assert auth.allows({}, NOW)
    assert not auth.token_matches("")
    assert not auth.session_valid("1.abc", NOW)


def test_a_bearer_header_must_carry_the_token_exactly() -> None:
    auth = TokenAuth(TOKEN)
    assert auth.allows({"HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}, NOW)
    assert auth.allows({"HTTP_AUTHORIZATION": f"bearer {TOKEN}"}, NOW)
    for header in ("", TOKEN, f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}"):
        assert not auth.allows({"HTTP_AUTHORIZATION": header}, NOW), header


def test_a_session_cookie_is_signed_by_the_token_holds_no_token_and_expires() -> None:
    auth = TokenAuth(TOKEN)
    value = auth.session_value(NOW)
    cookie = {"HTTP_COOKIE": f"other=1; {COOKIE_NAME}={value}"}

    assert TOKEN not in value
    assert auth.allows(cookie, NOW)
    assert auth.allows(cookie, NOW + SESSION_SECONDS - 1)
    assert not auth.allows(cookie, NOW + SESSION_SECONDS)
    assert not TokenAuth(TOKEN + "2").allows(cookie, NOW)  # a new token ends every session


@pytest.mark.parametrize(
    "tampered",
    [
        lambda v: v.replace(v.split(".")[0], str(int(v.split(".")[0]) + 3600)),  # later expiry
        lambda v: v[:-1] + ("0" if v[-1] != "0" else "1"),
        lambda v: v.split(".")[0],
        lambda v: "",
        lambda v: "x." + v.split(".")[1],
    ],
)
def test_a_changed_cookie_is_refused(tampered: object) -> None:
    auth = TokenAuth(TOKEN)
    value = tampered(auth.session_value(NOW))  # type: ignore[operator]
    assert not auth.allows({"HTTP_COOKIE": f"{COOKIE_NAME}={value}"}, NOW)


def test_a_malformed_cookie_header_is_no_session() -> None:
    assert not TokenAuth(TOKEN).allows({"HTTP_COOKIE": 'a="unterminated; ;;=='}, NOW)


def test_the_set_cookie_header_is_http_only_strict_and_secure_over_https() -> None:
    auth = TokenAuth(TOKEN)
    plain = auth.set_cookie_header(NOW, secure=False)
    assert plain.startswith(f"{COOKIE_NAME}=")
    assert "HttpOnly" in plain and "SameSite=Strict" in plain and "Path=/" in plain
    assert f"Max-Age={SESSION_SECONDS}" in plain and "Secure" not in plain
    assert auth.set_cookie_header(NOW, secure=True).endswith("; Secure")


@pytest.mark.parametrize(
    ("target", "where"),
    [
        ("/", "/"),
        ("/user?user=u1", "/user?user=u1"),
        ("/user?user=%3Cscript%3E", "/user?user=%3Cscript%3E"),
        ("/metrics", "/"),  # not a page a browser is sent back to
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("/login", "/"),
        ("/user?user=a\r\nSet-Cookie: x=1", "/user?user=aSet-Cookie%3A+x%3D1"),  # no CR LF
        ("", "/"),
    ],
)
def test_a_login_sends_back_only_to_a_page_of_this_server(target: str, where: str) -> None:
    assert safe_next(target) == where
