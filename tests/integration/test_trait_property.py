"""Computed traits as a property, on SQLite and PostgreSQL: whatever sequence of values (any
JSON, each spelled in one of many ways: number forms, key order, spacing) and of routing
patterns, after every sync

- a URL that receives everything holds, for each user, a value JSON-equal to the current one
  (a removed row, SQL NULL and JSON null all mean "no value");
- it was sent exactly the users whose value changed by JSON equality: a value spelled another
  way is no change, on either database (PostgreSQL decides by jsonb, SQLite by
  :mod:`syncer.core.jsonvalues`), and each value went out as the text it was stored as;
- a URL whose patterns leave the trait out is sent nothing about it, and keeps what it had;
  once it receives the trait again it is sent only what differs from what it holds.

Replicas are built the way a workflow would, from every request received, in timestamp order.
Each example has traits and URLs of its own in one database: the traits of earlier examples are
disabled, and so never synced again.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncer.core.jsonvalues import equality_key
from syncer.store import Store
from syncer.testing.tray_standin import TrayStandin
from tests.conftest import Upstream, run_sync

USERS = [f"u{n}" for n in range(4)]
# Each example runs a few real syncs, about a tenth of a second each.
MAX_EXAMPLES = min(settings().max_examples, 12)
ABSENT = "absent"  # the user has no row


# --- values, and their many spellings ------------------------------------------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-1000, max_value=1000)
    | st.text(alphabet='aé"\\ z', max_size=4)
)
values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "ü"]), inner, max_size=3)
    ),
    max_leaves=5,
)


def _number(value: Decimal | int, style: int) -> str:
    exact = Decimal(value)
    if style == 0 or not exact.is_finite():
        return str(value)
    if style == 1:
        return f"{exact:.6f}" if exact == exact.to_integral_value() else str(exact) + "0"
    return f"{exact:E}"  # 1.5E+1 ...


def spell(value: Any, style: int) -> str:
    """A JSON text of ``value``: the style picks number forms, key order and spacing."""
    space = " " * (style % 2)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, Decimal)):
        return _number(value, style % 3)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=style % 2 == 0)
    if isinstance(value, list):
        return "[" + f",{space}".join(spell(item, style) for item in value) + "]"
    items = sorted(value.items(), reverse=style % 2 == 1)
    inner = f",{space}".join(f"{json.dumps(k)}:{space}{spell(v, style)}" for k, v in items)
    return "{" + inner + "}"


@dataclass(frozen=True)
class Step:
    """Before one sync: each user's row (ABSENT, None for SQL NULL, or JSON text), and the
    routed URL's trait patterns (None: a plain URL, receiving everything)."""

    rows: dict[str, str | None]
    patterns: tuple[str, ...] | None


def scenarios(pool: list[Any]) -> st.SearchStrategy[list[Step]]:
    """Steps whose values come from a small pool, each spelled anew: equal values in other
    spellings recur from step to step, as do changes."""
    row = st.one_of(
        st.just(ABSENT),
        st.just(None),
        st.builds(spell, st.sampled_from(pool), st.integers(min_value=0, max_value=5)),
    )
    step = st.builds(
        Step,
        st.fixed_dictionaries({user: row for user in USERS}),
        st.sampled_from([None, ("ltv_*",), ("nothing_*",), ()]),
    )
    return st.lists(step, min_size=2, max_size=4)


def key_of(text: str | None) -> str | None:
    """The JSON-equality key of a row's value; None for no value."""
    if text in (None, ABSENT):
        return None
    key = equality_key(text)
    return None if key == "null" else key


def replica(standin: TrayStandin, path: str, key: str) -> dict[str, str]:
    """userId -> the equality key of the value a workflow at ``path`` holds now."""
    received = sorted((r.message["timestamp"], n, r) for n, r in enumerate(standin.received(path)))
    held: dict[str, str] = {}
    for _, _, request in received:
        message = request.message
        if key not in message["traits"]:
            continue
        # The value's text in the body: re-encoding the parsed message would lose digits.
        body = request.body.decode("utf-8")
        prefix = f'"traits":{{"{key}":'
        start = body.index(prefix) + len(prefix)
        value = json.JSONDecoder().raw_decode(body, start)
        text = body[start : value[1]]
        if key_of(text) is None:
            held.pop(message["userId"], None)
        else:
            held[message["userId"]] = equality_key(text)
    return held


def test_every_url_holds_the_current_values_by_json_equality(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    examples = itertools.count()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(scenario=st.lists(values, min_size=1, max_size=3).flatmap(scenarios))
    def example(scenario: list[Step]) -> None:
        n = next(examples)
        trait_id, key = f"tr_{n}", f"ltv_{n}"
        upstream.add_trait(trait_id, f"LTV {n}")
        routed_path, everything_path = f"/routed{n}", f"/all{n}"
        routed_url, everything_url = standin.url(routed_path), standin.url(everything_path)
        kept: dict[str, str] = {}
        previous: dict[str, str | None] = {}
        try:
            for step in scenario:
                present = {u: v for u, v in step.rows.items() if v != ABSENT}
                upstream.remove_values(trait_id, *USERS)
                upstream.set_values(trait_id, present)
                current = {u: k for u, v in step.rows.items() if (k := key_of(v)) is not None}
                before = replica(standin, everything_path, key)
                sent_before = len(standin.received(everything_path))
                entry: Any = (
                    routed_url
                    if step.patterns is None
                    else {"url": routed_url, "traits": list(step.patterns)}
                )

                report = run_sync(store, [entry, everything_url])

                assert report.fully_delivered
                assert replica(standin, everything_path, key) == current, step
                new = standin.received(everything_path)[sent_before:]
                changed = {u for u in USERS if before.get(u) != current.get(u)}
                assert sorted(r.message["userId"] for r in new) == sorted(changed), step
                respelled = {
                    u for u in USERS if u not in changed and step.rows[u] != previous.get(u)
                }
                hypothesis.event(f"users whose value was respelled: {len(respelled)}")
                previous = dict(step.rows)
                for request in new:  # sent as stored, byte for byte
                    stored = step.rows[request.message["userId"]]
                    if key_of(stored) is not None:
                        assert f'"{key}":{stored}'.encode() in request.body
                routed = replica(standin, routed_path, key)
                if step.patterns is None or step.patterns == ("ltv_*",):
                    assert routed == current, step
                    kept = routed
                else:
                    assert routed == kept, step
        finally:
            upstream.disable_trait(trait_id)

    example()
