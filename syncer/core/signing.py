"""Request signing as Tray's Segment trigger checks it."""

from __future__ import annotations

import hashlib
import hmac


def sign(body: bytes, secret: str) -> str:
    """Return the lowercase hex HMAC-SHA1 of the exact body bytes, keyed by the shared secret."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha1).hexdigest()


def signature_headers(body: bytes, secret: str | None) -> dict[str, str]:
    """The headers every request carries: JSON content type, and ``X-Signature`` with a secret."""
    headers = {"Content-Type": "application/json"}
    if secret:
        headers["X-Signature"] = sign(body, secret)
    return headers
