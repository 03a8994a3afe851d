"""The JSON equality of computed-trait values (:mod:`syncer.core.jsonvalues`) against
PostgreSQL's ``jsonb`` equality, on random values written out in random ways: key order,
duplicate keys, numbers as ``1``, ``1.0``, ``1e0``, ``-0``, many digits. The two must agree on
every pair, so that "changed" means the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from syncer.core.jsonvalues import equality_key, json_equal
from syncer.store.database import create_database_engine

POSTGRES_ONLY = pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)

numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(Decimal),
    st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-1000, max_value=1000),
    st.decimals(allow_nan=False, allow_infinity=False, places=17, min_value=-1, max_value=1),
    st.sampled_from([Decimal("0"), Decimal("0.1"), Decimal("1"), Decimal("100")]),
)
# jsonb refuses the NUL character (and UTF-8 has no lone surrogates); every other code point
# is kept as it is.
strings = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6
)
keys = st.sampled_from(["a", "b", "c", "é", "A"])
values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, strings),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(st.tuples(keys, children), max_size=4),  # an object: pairs, keys may repeat
    ),
    max_leaves=8,
)


class Obj(list[tuple[str, Any]]):
    """An object as written: its (key, value) pairs in order, a key possibly twice."""


def as_model(value: Any) -> Any:
    # st.lists of tuples stand for objects; other lists are arrays.
    if isinstance(value, list) and value and all(isinstance(i, tuple) for i in value):
        return Obj((key, as_model(item)) for key, item in value)
    if isinstance(value, list):
        return [as_model(item) for item in value]
    return value


def write_number(number: Decimal, rng: random.Random) -> str:
    """One of the ways JSON can write ``number``."""
    if number.is_zero():
        return rng.choice(["0", "-0", "0.0", "0e5", "-0.000"])
    plain = format(number, "f")
    forms = [plain, format(number, "E"), f"{plain}e0"]
    if "." not in plain:
        forms += [f"{plain}.0", f"{plain}0e-1"]
    return rng.choice(forms)


def write(value: Any, rng: random.Random) -> str:
    """JSON text for ``value``, written one of the ways that keep it the same value."""
    if isinstance(value, Obj):
        last = dict(value)  # what the object is: the last value given for each key
        # Earlier values of a repeated key may be written (the last one wins), then every key
        # with its value, in any order.
        decoys = [(k, v) for k, v in value if v is not last[k] and rng.random() < 0.5]
        finals = list(last.items())
        rng.shuffle(finals)
        return "{" + ",".join(f"{json.dumps(k)}:{write(v, rng)}" for k, v in decoys + finals) + "}"
    if isinstance(value, list):
        return "[" + ",".join(write(item, rng) for item in value) + "]"
    if isinstance(value, Decimal):
        return write_number(value, rng)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=rng.random() < 0.5)
    return json.dumps(value)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_database_engine(database_url)
    yield engine
    engine.dispose()


def jsonb_equal(engine: Engine, pairs: list[tuple[str, str]]) -> list[bool]:
    """PostgreSQL's verdict on each pair, in one statement."""
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT CAST(a AS jsonb) = CAST(b AS jsonb) FROM unnest("
                "CAST(:firsts AS text[]), CAST(:seconds AS text[])) WITH ORDINALITY AS t(a, b, n)"
                " ORDER BY n"
            ),
            {"firsts": [a for a, _ in pairs], "seconds": [b for _, b in pairs]},
        )
        return [bool(row[0]) for row in rows]


@POSTGRES_ONLY
def test_json_equality_is_postgresql_jsonb_equality(engine: Engine) -> None:
    @given(
        pairs=st.lists(st.tuples(values, values, st.booleans()), min_size=1, max_size=20),
        seed=st.integers(0, 2**32),
    )
    def example(pairs: list[tuple[Any, Any, bool]], seed: int) -> None:
        rng = random.Random(seed)
        texts = []
        for first, second, same in pairs:
            one = as_model(first)
            # Half the pairs are one value written two ways; the others, two values.
            other = one if same else as_model(second)
            texts.append((write(one, rng), write(other, rng)))
        expected = jsonb_equal(engine, texts)
        assert [json_equal(a, b) for a, b in texts] == expected, [
            (a, b, equality_key(a), equality_key(b), verdict)
            for (a, b), verdict in zip(texts, expected, strict=True)
            if json_equal(a, b) != verdict
        ]

    example()
