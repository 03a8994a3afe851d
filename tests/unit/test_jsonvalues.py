"""JSON equality of trait values (:mod:`syncer.core.jsonvalues`), by table; the integration test
``test_json_equality.py`` holds the same rule to PostgreSQL's jsonb on random values."""

from __future__ import annotations

import pytest

from syncer.core.jsonvalues import equality_key, json_equal


@pytest.mark.parametrize(
    ("one", "other", "equal"),
    [
        pytest.param("1", "1.0", True, id="1 = 1.0"),
        pytest.param("1e0", "10E-1", True, id="exponents"),
        pytest.param("100", "1e2", True, id="1e2 = 100"),
        pytest.param("0", "-0.0", True, id="-0 = 0"),
        pytest.param("0.1", "0.10000000000000001", False, id="no float rounding"),
        pytest.param(
            "12345678901234567890123456789012",
            "12345678901234567890123456789013",
            False,
            id="every digit counts",
        ),
        pytest.param('{"a":1,"b":2}', '{"b":2,"a":1}', True, id="key order"),
        pytest.param('{"a":1,"a":2}', '{"a":2}', True, id="last duplicate wins"),
        pytest.param('{"a":1,"a":2}', '{"a":1}', False, id="earlier duplicate lost"),
        pytest.param("[1,2]", "[2,1]", False, id="array order"),
        pytest.param("1", '"1"', False, id="number is not string"),
        pytest.param('"1E+2"', "100", False, id="string with a number's text"),
        pytest.param("true", "1", False, id="boolean is not number"),
        pytest.param("null", " null ", True, id="whitespace"),
        pytest.param('"\\u00e9"', '"é"', True, id="escapes"),
        pytest.param('"e\\u0301"', '"é"', False, id="no unicode normalisation"),
        pytest.param('{"a":[1.50,{"b":null}]}', '{ "a" : [ 1.5 , { "b" : null } ] }', True),
    ],
)
def test_json_equal(one: str, other: str, equal: bool) -> None:
    assert json_equal(one, other) is equal
    assert json_equal(other, one) is equal


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "{", "", "tru"])
def test_not_json_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        equality_key(text)
