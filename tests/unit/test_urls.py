"""Which configured URLs name the same workflow (:func:`syncer.core.urls.canonical_url`).

A cosmetic edit of the setting (scheme or host case, the default port, one trailing slash) must
keep a workflow's state, so it maps to the same canonical form; anything that may name another
workflow (the path's case, the query, a non-default port) must not. A URL that cannot be a
workflow's is refused with ValueError.
"""

from __future__ import annotations

import pytest

from syncer.core.urls import canonical_url, configured_url


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        pytest.param("https://tray.io/wf", "https://tray.io/wf", id="already-canonical"),
        pytest.param("HTTPS://Tray.IO/wf", "https://tray.io/wf", id="scheme-and-host-lowered"),
        pytest.param("http://tray.io:80/wf", "http://tray.io/wf", id="http-default-port-dropped"),
        pytest.param(
            "https://tray.io:443/wf", "https://tray.io/wf", id="https-default-port-dropped"
        ),
        pytest.param("https://tray.io:443", "https://tray.io", id="default-port-without-path"),
        pytest.param("http://tray.io:443/wf", "http://tray.io:443/wf", id="443-kept-for-http"),
        pytest.param("https://tray.io:80/wf", "https://tray.io:80/wf", id="80-kept-for-https"),
        pytest.param("https://tray.io:8443/wf", "https://tray.io:8443/wf", id="other-port-kept"),
        pytest.param("https://tray.io/wf/", "https://tray.io/wf", id="trailing-slash-ignored"),
        pytest.param("https://tray.io/", "https://tray.io", id="root-slash-ignored"),
        pytest.param("https://tray.io/wf//", "https://tray.io/wf/", id="only-one-slash-ignored"),
        pytest.param("https://tray.io/Wf/ABC", "https://tray.io/Wf/ABC", id="path-case-kept"),
        pytest.param("https://tray.io/wf?Key=V", "https://tray.io/wf?Key=V", id="query-kept"),
        pytest.param("https://tray.io/wf/?k=v", "https://tray.io/wf?k=v", id="slash-before-query"),
        pytest.param("https://tray.io/wf?k=v/", "https://tray.io/wf?k=v/", id="query-slash-kept"),
        pytest.param("  https://tray.io/wf \n", "https://tray.io/wf", id="whitespace-stripped"),
        pytest.param("http://[::1]:8080/wf", "http://[::1]:8080/wf", id="ipv6-with-port"),
        pytest.param("http://[::1]:80/wf/", "http://[::1]/wf", id="ipv6-default-port-dropped"),
        pytest.param("HTTP://[FE80::A]/wf", "http://[fe80::a]/wf", id="ipv6-lowered-brackets-kept"),
        pytest.param("http://127.0.0.1:9000/wf", "http://127.0.0.1:9000/wf", id="ipv4-literal"),
    ],
)
def test_canonical_url(url: str, canonical: str) -> None:
    assert canonical_url(url) == canonical


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("https://tray.io/wf", "https://tray.io/WF", id="path-case"),
        pytest.param("https://tray.io/wf?a=1", "https://tray.io/wf?a=2", id="query"),
        pytest.param("https://tray.io/wf", "https://tray.io:8443/wf", id="port"),
        pytest.param("http://tray.io/wf", "https://tray.io/wf", id="scheme"),
        pytest.param("https://tray.io/wf/", "https://tray.io/wf//", id="two-trailing-slashes"),
    ],
)
def test_urls_that_may_name_different_workflows_stay_apart(first: str, second: str) -> None:
    assert canonical_url(first) != canonical_url(second)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("", id="empty"),
        pytest.param("tray.io/wf", id="no-scheme"),
        pytest.param("ftp://tray.io/wf", id="ftp-scheme"),
        pytest.param("mailto:ops@tray.io", id="mailto-scheme"),
        pytest.param("https://", id="no-host"),
        pytest.param("http:///wf", id="empty-host"),
        pytest.param("https://tray.io:abc/wf", id="port-not-a-number"),
        pytest.param("https://tray.io:99999/wf", id="port-out-of-range"),
        pytest.param("https://tray.io:-1/wf", id="negative-port"),
        pytest.param("http://[::1/wf", id="unclosed-ipv6-bracket"),
    ],
)
def test_invalid_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        canonical_url(url)


CONFIGURED = ["https://tray.io/wf-a", "HTTPS://Tray.IO:443/wf-b/"]


@pytest.mark.parametrize(
    ("wanted", "found"),
    [
        pytest.param("https://tray.io/wf-a", "https://tray.io/wf-a", id="as-configured"),
        pytest.param("https://tray.io/wf-b", "HTTPS://Tray.IO:443/wf-b/", id="spelled-as-set"),
        pytest.param("https://TRAY.io/wf-a/", "https://tray.io/wf-a", id="another-spelling"),
        pytest.param("https://tray.io/WF-A", None, id="path-case-is-another-workflow"),
        pytest.param("https://tray.io/wf-c", None, id="not-configured"),
        pytest.param("wf-a", None, id="not-a-url"),
        pytest.param("https://tray.io:x/wf-a", None, id="bad-port"),
    ],
)
def test_configured_url_finds_the_same_workflow_as_configured(
    wanted: str, found: str | None
) -> None:
    assert configured_url(CONFIGURED, wanted) == found
