"""An exchange request carries the URL's secret to wherever the bodies are signed (perhaps the
helper process): it never shows it."""

from __future__ import annotations

from datetime import datetime

from syncer.core.payload import Computation
from syncer.store.claims import Claim
from syncer.sync.exchanging import ExchangeRequest


def test_an_exchange_request_never_shows_its_secret() -> None:
    request = ExchangeRequest(
        Claim("token", "host:1:abc", 60.0),
        1,
        Computation("audience", "aud_1", "buyers", "spa_test"),
        results=[],
        want=10,
        after_id=0,
        now=datetime(2026, 11, 30),
        max_rejections=3,
        rate_per_second=0.0,
        clear_refusal=True,
        secret="s3cr3t-value",
    )
    assert request.secret == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(request) and "s3cr3t-value" not in str(request)
