"""Request signing: HMAC-SHA1 of the exact body, as Tray's Segment trigger checks it."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from syncer.core.signing import sign, signature_headers

# Computed once with:
#   python3 -c "import hmac,hashlib;
#   print(hmac.new(b'secret', b'{\"a\":1}', hashlib.sha1).hexdigest())"
HARD_VECTOR = "f8446672f033e4b2beafc5ca3a71eafcd2cafb6e"


def test_hard_vector() -> None:
    assert sign(b'{"a":1}', "secret") == HARD_VECTOR


@pytest.mark.parametrize(
    ("body", "secret"),
    [
        (b'{"a":1}', "secret"),
        (b'{"a": 1}', "secret"),
        (b"", "secret"),
        (b'{"type":"identify","userId":"u1"}', "test-secret"),
        ('{"name":"Jürgen ✨"}'.encode(), "s3cr3t"),
        (b'{"a":1}', "sécret-ünïcode"),
        (bytes(range(256)), "k" * 100),  # key longer than the SHA-1 block size
    ],
)
def test_sign_matches_hmac_sha1(body: bytes, secret: str) -> None:
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha1).hexdigest()
    signature = sign(body, secret)
    assert signature == expected
    assert len(signature) == 40
    assert signature == signature.lower()


def test_signature_covers_exact_bytes() -> None:
    assert sign(b'{"a":1}', "secret") != sign(b'{"a": 1}', "secret")
    assert sign(b'{"a":1}', "secret") != sign(b'{"a":1}\n', "secret")
    assert sign(b'{"a":1}', "secret") != sign(b'{"a":1}', "Secret")


def test_headers_with_secret() -> None:
    assert signature_headers(b'{"a":1}', "secret") == {
        "Content-Type": "application/json",
        "X-Signature": HARD_VECTOR,
    }


@pytest.mark.parametrize("secret", [None, ""])
def test_no_signature_header_without_secret(secret: str | None) -> None:
    assert signature_headers(b'{"a":1}', secret) == {"Content-Type": "application/json"}


@pytest.mark.parametrize("secret", [None, "", "secret"])
@pytest.mark.parametrize("body", [b"", b'{"a":1}'])
def test_content_type_always_json(body: bytes, secret: str | None) -> None:
    assert signature_headers(body, secret)["Content-Type"] == "application/json"
