from __future__ import annotations

import json

import pytest

from syncer.render import printable

NOT_UTF8 = b"\xff\xfeid".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("value", "for_table", "expected"),
    [
        ("plain", False, "plain"),
        ("VIP's ✨", True, "VIP's ✨"),
        (NOT_UTF8, False, "\\xff\\xfeid"),
        (NOT_UTF8, True, "\\xff\\xfeid"),
        ("line\nbreak", True, "line\\x0abreak"),
        ("line\nbreak", False, "line\nbreak"),
        ({"k": [NOT_UTF8, 3, None]}, False, {"k": ["\\xff\\xfeid", 3, None]}),
    ],
)
def test_printable(value: object, for_table: bool, expected: object) -> None:
    assert printable(value, escape_controls=for_table) == expected


def test_printable_output_encodes_as_strict_utf8_json() -> None:
    text = json.dumps(printable({"user_id": NOT_UTF8}), ensure_ascii=False)
    assert json.loads(text.encode("utf-8"))["user_id"] == "\\xff\\xfeid"
