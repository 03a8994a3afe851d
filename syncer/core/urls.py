"""Which configured URLs are the same workflow: the canonical form destinations are keyed by."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_url(url: str) -> str:
    """The form under which a workflow URL's state is kept.

    Scheme and host are lower-cased, the default port is dropped, and one trailing slash of the
    path is ignored; the path's case and the query are kept, since they may name different
    workflows. Requests still go to the URL exactly as configured. Raises ValueError for a URL
    that is not http(s) with a host, or whose port is not a number.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = parts.path[:-1] if parts.path.endswith("/") else parts.path
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{netloc}{path}{query}"


def configured_url(configured: Sequence[str], wanted: str) -> str | None:
    """The configured URL that is the same workflow as ``wanted`` (spelled as configured), or
    None when none is, or when ``wanted`` is not a workflow URL at all."""
    try:
        canonical = canonical_url(wanted)
    except ValueError:
        return None
    for url in configured:
        if canonical_url(url) == canonical:
            return url
    return None
