"""The README's alert queries, read from the README itself and run on SQLite and PostgreSQL
against what real runs recorded: the documentation is what a monitor would paste."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import text

from syncer.store import Store
from syncer.testing.tray_standin import TrayStandin
from tests.conftest import Upstream, run_sync

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_query(marker: str) -> str:
    """The ```sql block of the README whose first line is ``-- alert: <marker>``."""
    for block in re.findall(r"```sql\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        if block.startswith(f"-- alert: {marker}\n"):
            return str(block)
    raise AssertionError(f"no README query marked {marker!r}")


def test_the_shrink_alert_finds_what_shrank_by_more_than_a_fifth_between_the_last_two_runs(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    query = text(readme_query("shrank since the last run"))
    url = standin.url("/wf")
    upstream.add_audience("aud_big", "Big")
    upstream.add_audience("aud_steady", "Steady")
    upstream.add("aud_big", *[f"u{n}" for n in range(10)])
    upstream.add("aud_steady", *[f"u{n}" for n in range(10)])
    upstream.add_trait("tr_ltv", "LTV")
    upstream.set_values("tr_ltv", {f"u{n}": str(n) for n in range(10)})
    run_sync(store, [url])
    with store.engine.connect() as connection:
        assert connection.execute(query).all() == []  # one run: nothing to compare with

    upstream.remove("aud_big", "u0", "u1", "u2")  # 30% gone
    upstream.remove("aud_steady", "u0", "u1")  # 20% gone: not more than the threshold
    upstream.remove_values("tr_ltv", "u0", "u1", "u2", "u3", "u4")  # 50% gone
    second = run_sync(store, [url])
    with store.engine.connect() as connection:
        found = [tuple(row) for row in connection.execute(query)]
    assert found == [
        ("audience", "aud_big", 10, 7, second.run_id),
        ("trait", "tr_ltv", 10, 5, second.run_id),
    ]

    run_sync(store, [url])  # no change since: the alert clears
    with store.engine.connect() as connection:
        assert connection.execute(query).all() == []
