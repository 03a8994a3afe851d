"""``syncer inspect`` after real syncs: every figure checked against what really happened.

Three workflow URLs: /a accepts everything, /b refuses one user for good (400), /c is down
(503). Two syncs run through the real command, with a membership change in between; then each
``inspect`` command is read as JSON and compared with what the stand-in received, and as a
table, which must be aligned and show the same ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from syncer.testing.tray_standin import Received, Reply, TrayStandin
from tests.conftest import Upstream
from tests.integration.cli_helpers import (
    Result,
    cli,
    cli_many,
    json_out,
    show,
    write_settings,
)

BLOCKED_BODY = b'{"error":"user u3 is blocked by this workflow"}'


def refuse_u3(_path: str, body: bytes) -> Reply:
    if json.loads(body)["userId"] == "u3":
        return Reply(status=400, body=BLOCKED_BODY)
    return Reply()


def accepted(standin: TrayStandin, path: str) -> list[Received]:
    return [r for r in standin.received(path) if 200 <= r.status < 300]


def last_told(standin: TrayStandin, path: str, key: str) -> dict[str, tuple[bool, str]]:
    """User -> (value, messageId) of the last identify for ``key`` that ``path`` accepted."""
    told: dict[str, tuple[bool, str]] = {}
    for received in accepted(standin, path):
        message = received.message
        if message["type"] == "identify" and key in message["traits"]:
            told[message["userId"]] = (message["traits"][key], message["messageId"])
    return told


def table_rows(output: str) -> tuple[list[str], list[dict[str, str]]]:
    """Headers and rows of an aligned table (the header line first, then one line per row).

    Columns are found from the header (separated by two or more spaces); every row must have
    its cells start exactly where their headers start, with a space before each.
    """
    lines = [line for line in output.splitlines() if line.strip()]
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    headers = [header[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
    rows = []
    for line in lines[1:]:
        cells = {}
        for index, (start, end) in enumerate(zip(starts, [*starts[1:], None], strict=True)):
            if start > 0 and len(line) > start:
                assert line[start - 1] == " ", f"column {headers[index]} misaligned:\n{output}"
            cell = line[start:end]
            assert not cell.startswith(" ") or not cell.strip(), (
                f"column {headers[index]} misaligned in {line!r}:\n{output}"
            )
            cells[headers[index]] = cell.strip()
        rows.append(cells)
    return headers, rows


def cell(value: Any) -> str:
    """A JSON value as the table shows it."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


@pytest.fixture
def scenario(
    database_url: str, upstream: Upstream, standin: TrayStandin, tmp_path: Path
) -> dict[str, Any]:
    """Two real syncs with known changes; returns what each URL received run by run."""
    upstream.add_audience("aud_1", "Buyers")
    upstream.add_audience("aud_2", "VIP Customers")
    upstream.add("aud_1", "u1", "u2", "u3", "u4", "u5")
    upstream.add("aud_2", "u1", "u2")
    standin.respond("/b", refuse_u3)
    standin.respond("/c", Reply(status=503, body=b'{"error":"maintenance"}'))
    urls = {name: standin.url(f"/{name}") for name in ("a", "b", "c")}
    settings = write_settings(tmp_path / "settings.toml", database_url, list(urls.values()))

    first = cli("sync", settings=settings)
    assert first.returncode == 1, show(first)
    after_first = {name: len(accepted(standin, f"/{name}")) for name in urls}
    upstream.remove("aud_1", "u5")
    upstream.add("aud_1", "u6")
    second = cli("sync", settings=settings)
    assert second.returncode == 1, show(second)
    after_second = {name: len(accepted(standin, f"/{name}")) for name in urls}
    return {
        "settings": settings,
        "urls": urls,
        "accepted_per_run": [
            sum(after_first.values()),
            sum(after_second.values()) - sum(after_first.values()),
        ],
    }


def test_inspect_json_and_tables_tell_what_really_happened(
    scenario: dict[str, Any], standin: TrayStandin
) -> None:
    settings, urls = scenario["settings"], scenario["urls"]
    commands = [
        ["audiences"],
        ["members", "aud_1", "--limit", "2"],
        ["user", "u3"],
        ["user", "u5"],
        ["runs"],
        ["failures"],
    ]
    tables = [c for c in commands if c[0] != "user"]
    results = cli_many(
        *(["inspect", *c, "--format", "json"] for c in commands),
        *(["inspect", *c, "--format", "table"] for c in tables),
        ["inspect", "members", "nope", "--format", "json"],
        settings=settings,
    )
    names = ["audiences", "members", "u3", "u5", "runs", "failures"]
    as_json = dict(zip(names, results[:6], strict=True))
    as_table = dict(zip(("audiences", "members", "runs", "failures"), results[6:10], strict=True))

    def table(name: str) -> Result:
        assert as_table[name].returncode == 0, show(as_table[name])
        return as_table[name]

    checks: dict[str, Callable[[], None]] = {
        "audiences": lambda: check_audiences(
            json_out(as_json["audiences"]), table("audiences"), standin, urls
        ),
        "members": lambda: check_members(json_out(as_json["members"]), table("members")),
        "user u3": lambda: check_user_u3(json_out(as_json["u3"]), standin, urls),
        "user u5": lambda: check_user_u5(json_out(as_json["u5"]), standin, urls),
        "runs": lambda: check_runs(
            json_out(as_json["runs"]), table("runs"), scenario["accepted_per_run"]
        ),
        "failures": lambda: check_failures(json_out(as_json["failures"]), table("failures"), urls),
        "unknown audience": lambda: check_unknown_audience(results[-1]),
    }
    # Every command is checked, and every problem reported, even when an early one fails.
    problems = []
    for name, check in checks.items():
        try:
            check()
        except AssertionError as error:
            problems.append(f"inspect {name}: {error}")
    assert not problems, "\n\n".join(problems)


def check_unknown_audience(result: Result) -> None:
    assert result.returncode == 2, show(result)
    assert len(result.stderr.splitlines()) == 1 and "nope" in result.stderr, show(result)
    assert result.stdout == "", show(result)


def check_audiences(
    records: list[dict[str, Any]], table: Result, standin: TrayStandin, urls: dict[str, str]
) -> None:
    by_id = {r["id"]: r for r in records}
    assert sorted(by_id) == ["aud_1", "aud_2"]
    buyers, vips = by_id["aud_1"], by_id["aud_2"]
    assert (buyers["key"], buyers["members"], buyers["enabled"]) == ("buyers", 5, True)
    assert (vips["key"], vips["members"]) == ("vip_customers", 2)
    expected = {
        # (audience, url): (told members, pending entries, pending exits, rejected, complete)
        ("aud_1", "a"): (5, 0, 0, 0, True),
        ("aud_1", "b"): (4, 0, 0, 1, False),  # u3 refused for good
        ("aud_1", "c"): (0, 5, 0, 0, False),  # down: every current member waits
        ("aud_2", "a"): (2, 0, 0, 0, True),
        ("aud_2", "b"): (2, 0, 0, 0, True),
        ("aud_2", "c"): (0, 2, 0, 0, False),
    }
    for (audience_id, name), (told, entries, exits, rejected, complete) in expected.items():
        (per_url,) = [u for u in by_id[audience_id]["urls"] if u["url"] == urls[name]]
        key = by_id[audience_id]["key"]
        really_told = sum(v for v, _ in last_told(standin, f"/{name}", key).values())
        assert really_told == told, (audience_id, name)
        assert per_url["told_members"] == told, (audience_id, name, per_url)
        assert per_url["pending_entries"] == entries, (audience_id, name, per_url)
        assert per_url["pending_exits"] == exits, (audience_id, name, per_url)
        assert per_url["rejected"] == rejected, (audience_id, name, per_url)
        assert (per_url["last_successful_sync"] is not None) == complete, (audience_id, name)
    headers, rows = table_rows(table.stdout)
    assert {"ID", "KEY", "MEMBERS", "URL", "TOLD", "REJECTED"} <= set(headers), table.stdout
    # Rows after an audience's first one leave its columns blank: they belong to it.
    shown, current = {}, ""
    for row in rows:
        current = row["ID"] or current
        shown[(current, row["URL"])] = (
            row["TOLD"], row["PENDING IN"], row["PENDING OUT"], row["REJECTED"]
        )  # fmt: skip
    assert shown == {
        (r["id"], u["url"]): tuple(
            cell(u[k]) for k in ("told_members", "pending_entries", "pending_exits", "rejected")
        )
        for r in records
        for u in r["urls"]
    }, table.stdout
    assert {r["KEY"] for r in rows if r["ID"]} == {"buyers", "vip_customers"}


def check_members(record: dict[str, Any], table: Result) -> None:
    assert record["audience_id"] == "aud_1"
    assert (record["total"], record["shown"]) == (5, 2)
    assert [m["user_id"] for m in record["members"]] == ["u1", "u2"]
    assert not any(m["suppressed"] for m in record["members"])
    headers, rows = table_rows(table.stdout.rsplit("\n", 2)[0])
    assert headers[0] == "USER ID", table.stdout
    assert [r["USER ID"] for r in rows] == ["u1", "u2"], table.stdout
    assert "2 of 5" in table.stdout


def check_user_u3(record: dict[str, Any], standin: TrayStandin, urls: dict[str, str]) -> None:
    assert record["user_id"] == "u3" and record["deleted"] is False
    assert [a["id"] for a in record["audiences"]] == ["aud_1"]
    # Only /a accepted u3: its last told value and the messageId it really received.
    (told,) = record["told"]
    value, message_id = last_told(standin, "/a", "buyers")["u3"]
    assert (told["url"], told["audience_id"], told["value"]) == (urls["a"], "aud_1", value)
    assert told["message_id"] == message_id
    pending = {p["url"]: p for p in record["pending"]}
    assert set(pending) == {urls["b"], urls["c"]}
    assert pending[urls["b"]]["status"] == "rejected"
    assert pending[urls["b"]]["last_status"] == 400
    assert pending[urls["c"]]["status"] == "pending"
    refused = [r.message["messageId"] for r in standin.received("/b") if r.status == 400]
    assert set(refused) == {pending[urls["b"]]["message_id"]}


def check_user_u5(record: dict[str, Any], standin: TrayStandin, urls: dict[str, str]) -> None:
    assert record["audiences"] == [] and record["pending"] == []
    told = {t["url"]: t for t in record["told"]}
    # /a and /b were told u5 entered and then left; /c was never told anything.
    assert set(told) == {urls["a"], urls["b"]}
    for name in ("a", "b"):
        value, message_id = last_told(standin, f"/{name}", "buyers")["u5"]
        assert value is False
        assert told[urls[name]]["value"] is False
        assert told[urls[name]]["message_id"] == message_id


def check_runs(records: list[dict[str, Any]], table: Result, accepted_per_run: list[int]) -> None:
    assert len(records) == 2
    newest, oldest = records
    assert newest["id"] > oldest["id"]
    assert {r["trigger"] for r in records} == {"manual"}
    assert {r["status"] for r in records} == {"partial"}
    # First run: 5 + 2 members new to each of 3 URLs; 13 accepted, u3 refused by /b, 7 for /c.
    assert (oldest["audiences"], oldest["entered"], oldest["exited"]) == (2, 21, 0)
    assert oldest["delivered"] == accepted_per_run[0] == 13
    assert (oldest["pending"], oldest["rejected"]) == (7, 1)
    # Second run: u6 entered and u5 left; /a and /b accept both; /c still has 7 waiting.
    assert newest["exited"] == 2
    assert newest["delivered"] == accepted_per_run[1] == 4
    assert (newest["pending"], newest["rejected"]) == (7, 1)
    assert all(r["duration_seconds"] is not None for r in records)
    headers, rows = table_rows(table.stdout)
    assert {"RUN", "TRIGGER", "STATUS", "DELIVERED"} <= set(headers), table.stdout
    assert [(r["RUN"], r["TRIGGER"], r["STATUS"], r["DELIVERED"], r["PENDING"]) for r in rows] == [
        (str(x["id"]), x["trigger"], x["status"], str(x["delivered"]), str(x["pending"]))
        for x in records
    ], table.stdout


def check_failures(records: list[dict[str, Any]], table: Result, urls: dict[str, str]) -> None:
    assert {r["url"] for r in records} == {urls["b"], urls["c"]}
    (refusal,) = [r for r in records if r["url"] == urls["b"]]
    assert (refusal["type"], refusal["user_id"], refusal["state"]) == ("identify", "u3", "rejected")
    assert refusal["last_status"] == 400
    assert "blocked by this workflow" in refusal["last_error"]
    down = [r for r in records if r["url"] == urls["c"]]
    assert down
    for failure in down:
        assert failure["state"] == "retrying", failure
        assert failure["last_status"] == 503, failure
        assert failure["attempts"] >= 1
    headers, rows = table_rows(table.stdout)
    assert {"URL", "USER ID", "STATE", "LAST STATUS"} <= set(headers), table.stdout
    assert sorted((r["URL"], r["USER ID"], r["STATE"], r["LAST STATUS"]) for r in rows) == sorted(
        (r["url"], r["user_id"], r["state"], cell(r["last_status"])) for r in records
    ), table.stdout
