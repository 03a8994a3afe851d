"""When two computed-trait values are the same: JSON equality, one rule on every database.

A trait's value is sent exactly as upstream stored it (``0.1`` stays ``0.1``, key order kept),
but whether it *changed* is decided by JSON equality, PostgreSQL's ``jsonb`` equality, so that
the rule is the same on SQLite (where this module's key is compared) and on PostgreSQL (where
the server compares ``jsonb``):

- objects are equal when they have the same keys with equal values, in any order; of a key
  given twice, the last value counts;
- numbers are equal when their values are: ``1``, ``1.0``, ``1e0`` and ``10E-1`` are one value,
  and so are ``0`` and ``-0``; ``0.1`` and ``0.10000000000000001`` are not (no float rounding);
- strings are equal when their code points are (no Unicode normalisation);
- arrays are equal element by element, in order; ``true``, ``false`` and ``null`` only equal
  themselves, and no value of one type equals a value of another (``1`` is not ``"1"``).

``tests/integration/test_json_equality.py`` holds this rule to PostgreSQL's on random values.
"""

from __future__ import annotations

import json
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal
from typing import Any, NoReturn


def _number(text: str) -> Decimal:
    return Decimal(text)  # exact: a Decimal built from text is never rounded


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    if isinstance(value, Decimal):
        if value.is_zero():
            return _Number("0")
        # normalize() strips trailing zeros and folds the exponent: 1.0, 1e0 and 10E-1 -> 1.
        # Its context keeps every digit (the default one would round to 28).
        exact = Context(prec=len(value.as_tuple().digits), Emax=MAX_EMAX, Emin=MIN_EMIN)
        return _Number(str(value.normalize(exact)))
    return value


class _Number(str):
    """A number's canonical text, told apart from a string with the same characters."""


def _encode(value: Any) -> str:
    if isinstance(value, _Number):
        return str.__str__(value)
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(f"{_string(k)}:{_encode(v)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    return _string(value) if isinstance(value, str) else json.dumps(value)


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def equality_key(text: str) -> str:
    """A text that is the same for two JSON texts exactly when their values are JSON-equal
    (see the module's rule). Raises ValueError for a text that is not JSON."""
    parsed = json.loads(text, parse_float=_number, parse_int=_number, parse_constant=_not_json)
    return _encode(_canonical(parsed))


def json_equal(one: str, other: str) -> bool:
    """Whether two JSON texts hold equal values (the module's rule)."""
    return equality_key(one) == equality_key(other)
