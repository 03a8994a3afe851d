"""Routing changes, as a property: whatever sequence of memberships and routing patterns, after
every sync each URL's replica of an audience it receives equals the membership, and its replica
of an audience it does not receive is exactly what it had when it last received it (nothing is
sent about it meanwhile); a URL that receives everything always matches the membership.

The replicas are built the way a workflow would, from every request it received, in timestamp
order (:func:`syncer.core.diff.apply_received`). Each example has audiences and URLs of its own,
in one database: the audiences of earlier examples are disabled, and so never synced again.
SQLite only: what is routed where is decided before the database is asked anything, and
``test_routing.py`` runs the same changes on both databases.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncer.core.diff import TRUE, apply_received
from syncer.store import Store
from syncer.testing.tray_standin import TrayStandin
from tests.conftest import Upstream, run_sync

USERS = [f"u{n}" for n in range(5)]
# name -> its trait key at example n is "<name>_<n>": loyal_a_3 ...
AUDIENCE_NAMES = {"a": "Loyal A", "b": "Loyal B", "c": "Churn C"}
# What the routed URL's entry says (None: a plain URL), and the audiences it then receives.
PATTERNS: dict[tuple[str, ...] | None, set[str]] = {
    None: {"a", "b", "c"},
    ("loyal_*",): {"a", "b"},
    ("churn_*",): {"c"},
    ("loyal_a_*", "churn_*"): {"a", "c"},
    ("loyal_b_*",): {"b"},
}
# Each example runs a few real syncs, about a tenth of a second each.
MAX_EXAMPLES = min(settings().max_examples, 15)


@dataclass(frozen=True)
class Step:
    """Before one sync: each audience's members, and the routed URL's patterns."""

    members: dict[str, frozenset[str]]
    patterns: tuple[str, ...] | None


steps = st.builds(
    Step,
    st.fixed_dictionaries({name: st.frozensets(st.sampled_from(USERS)) for name in AUDIENCE_NAMES}),
    st.sampled_from(list(PATTERNS)),
)


def replicas(standin: TrayStandin, path: str, keys: dict[str, str]) -> dict[str, set[str]]:
    """Audience name -> the members a workflow at ``path`` would believe in."""
    received: dict[str, list[tuple[str, str, str]]] = {name: [] for name in keys}
    by_key = {key: name for name, key in keys.items()}
    for request in standin.received(path):
        message = request.message
        for key, value in message["traits"].items():
            if key in by_key:
                received[by_key[key]].append(
                    (message["timestamp"], message["userId"], "true" if value else "false")
                )
    return {
        name: {
            user
            for user, value in apply_received(
                {}, [(user, value) for _, user, value in sorted(messages)]
            ).items()
            if value == TRUE
        }
        for name, messages in received.items()
    }


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_each_url_matches_what_it_receives_and_keeps_what_it_no_longer_does(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    examples = itertools.count()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(scenario=st.lists(steps, min_size=2, max_size=4))
    def example(scenario: list[Step]) -> None:
        n = next(examples)
        ids = {name: f"aud_{name}_{n}" for name in AUDIENCE_NAMES}
        titles = AUDIENCE_NAMES
        keys = {name: f"{title.lower().replace(' ', '_')}_{n}" for name, title in titles.items()}
        for name, title in AUDIENCE_NAMES.items():
            upstream.add_audience(ids[name], f"{title} {n}")
        routed_path, everything_path = f"/routed{n}", f"/all{n}"
        routed_url, everything_url = standin.url(routed_path), standin.url(everything_path)
        kept: dict[str, set[str]] = {name: set() for name in AUDIENCE_NAMES}
        try:
            for step in scenario:
                for name, members in step.members.items():
                    upstream.set_members(ids[name], set(members))
                before = replicas(standin, routed_path, keys)
                entry: Any = (
                    routed_url
                    if step.patterns is None
                    else {"url": routed_url, "audiences": list(step.patterns)}
                )

                report = run_sync(store, [entry, everything_url])

                assert report.fully_delivered
                now = replicas(standin, routed_path, keys)
                assert replicas(standin, everything_path, keys) == {
                    name: set(members) for name, members in step.members.items()
                }
                for name in AUDIENCE_NAMES:
                    if name in PATTERNS[step.patterns]:
                        assert now[name] == set(step.members[name]), (name, step)
                        kept[name] = now[name]
                    else:
                        assert now[name] == before[name] == kept[name], (name, step)
        finally:
            for audience_id in ids.values():
                upstream.update_audience(audience_id, enabled=False)

    example()
