"""The SQL that decides which membership rows can be sent matches the Python rule exactly.

The planner never queues a row that :func:`syncer.core.payload.user_input_problem` refuses, and
it decides that in SQL (:func:`syncer.store.sql.row_problem`): on SQLite through the Python
function itself, on PostgreSQL through a regular expression. A table of awkward values, written
to ``audience_memberships`` in each database, must get exactly the Python function's verdict
(and the verdict this table expects); on SQLite, text that is not UTF-8 must be reported as a
problem instead of failing the query.
"""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import insert, select

from syncer.core.payload import MAX_EMAIL_LENGTH, MAX_USER_ID_LENGTH, user_input_problem
from syncer.store import Store
from syncer.store.schema import audience_memberships
from syncer.store.sql import row_problem
from tests.conftest import Upstream

AUDIENCE = "aud_rows"
EMPTY = "user_id is empty"
USER_TOO_LONG = f"user_id is longer than {MAX_USER_ID_LENGTH} characters"
USER_CONTROL = "user_id contains control characters or is not valid UTF-8"
ANONYMOUS_BAD = "anonymous_id is over-long, contains control characters or is not valid UTF-8"
EMAIL_BAD = "email is over-long, contains control characters or is not valid UTF-8"


def email_of_length(length: int) -> str:
    """A plausible email address of exactly ``length`` characters."""
    return "e" * (length - len("@example.com")) + "@example.com"


# (user_id, anonymous_id, email, the problem expected); user ids are unique within the table.
ROWS = {
    "empty-user-id": ("", None, None, EMPTY),
    "spaces-only-user-id": ("   ", None, None, EMPTY),
    "user-id-with-spaces-around": ("  spaced  ", None, None, None),
    "tab-only-user-id": ("\t", None, None, USER_CONTROL),
    "user-id-with-\\x01": ("user\x01", None, None, USER_CONTROL),
    "user-id-with-\\x1f": ("user\x1f", None, None, USER_CONTROL),
    "user-id-with-DEL-\\x7f": ("user\x7f", None, None, USER_CONTROL),
    "user-id-with-C1-\\x80": ("user\x80", None, None, USER_CONTROL),
    "user-id-with-C1-\\x9f": ("user\x9f", None, None, USER_CONTROL),
    "user-id-with-\\xa0-after-C1": ("user\xa0", None, None, None),
    "nbsp-only-user-id": ("\xa0", None, None, None),
    "user-id-512-chars": ("u" * MAX_USER_ID_LENGTH, None, None, None),
    "user-id-513-chars": ("v" * (MAX_USER_ID_LENGTH + 1), None, None, USER_TOO_LONG),
    "user-id-512-two-byte-chars": ("é" * MAX_USER_ID_LENGTH, None, None, None),
    "user-id-513-two-byte-chars": ("è" * (MAX_USER_ID_LENGTH + 1), None, None, USER_TOO_LONG),
    "user-id-512-emoji": ("🎉" * MAX_USER_ID_LENGTH, None, None, None),
    "non-ascii-letters": ("Zoë-Ünïcødé-日本", None, None, None),
    "emoji": ("user-🎉", None, None, None),
    "too-long-beats-control": ("\x01" * (MAX_USER_ID_LENGTH + 1), None, None, USER_TOO_LONG),
    "all-nulls": ("plain", None, None, None),
    "empty-anonymous-id-and-email": ("empties", "", "", None),
    "valid-email": ("mailed", "anon-1", "someone@example.com", None),
    "email-with-\\x01": ("bad-mail", None, "some\x01one@example.com", EMAIL_BAD),
    "email-with-\\x9f": ("bad-mail-c1", None, "someone\x9f@example.com", EMAIL_BAD),
    "email-512-chars": ("mail-512", None, email_of_length(MAX_EMAIL_LENGTH), None),
    "email-513-chars": ("mail-513", None, email_of_length(MAX_EMAIL_LENGTH + 1), EMAIL_BAD),
    "anonymous-id-512-chars": ("anon-max", "a" * MAX_USER_ID_LENGTH, None, None),
    "anonymous-id-513-chars": ("anon-long", "a" * (MAX_USER_ID_LENGTH + 1), None, ANONYMOUS_BAD),
    "anonymous-id-with-tab": ("anon-tab", "a\tb", None, ANONYMOUS_BAD),
    "user-id-problem-before-email-problem": (" ", None, "x\x01", EMPTY),
    "anonymous-id-problem-before-email-problem": ("both-bad", "\x7f", "x\x01", ANONYMOUS_BAD),
}


def problems_in_sql(store: Store) -> dict[str, str | None]:
    """user_id -> what the SQL expression says of that membership row."""
    m = audience_memberships
    with store.engine.connect() as connection:
        problem = row_problem(connection, m.c.user_id, m.c.anonymous_id, m.c.email)
        rows = connection.execute(
            select(m.c.user_id, problem).where(m.c.audience_id == AUDIENCE)
        ).all()
    return {row[0]: row[1] for row in rows}


def test_sql_row_problem_matches_the_python_rule(store: Store, upstream: Upstream) -> None:
    upstream.add_audience(AUDIENCE, "Awkward rows")
    with store.engine.begin() as connection:
        connection.execute(
            insert(audience_memberships),
            [
                {"audience_id": AUDIENCE, "user_id": u, "anonymous_id": a, "email": e}
                for u, a, e, _ in ROWS.values()
            ],
        )

    in_sql = problems_in_sql(store)

    assert len(in_sql) == len(ROWS)
    wrong = {}
    for name, (user_id, anonymous_id, email, expected) in ROWS.items():
        in_python = user_input_problem(user_id, anonymous_id, email)
        if not (in_sql[user_id] == in_python == expected):
            wrong[name] = {"sql": in_sql[user_id], "python": in_python, "expected": expected}
    assert wrong == {}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # PostgreSQL text is UTF-8
@pytest.mark.parametrize(
    ("column", "raw", "expected"),
    [
        pytest.param("user_id", b"\xff\xfe-user", USER_CONTROL, id="user-id-not-utf8"),
        pytest.param("user_id", b"nul\x00user", USER_CONTROL, id="user-id-with-nul"),
        pytest.param("anonymous_id", b"anon-\xc3", ANONYMOUS_BAD, id="anonymous-id-not-utf8"),
        pytest.param("email", b"mail-\xed\xa0\x80@x", EMAIL_BAD, id="email-encoded-surrogate"),
    ],
)
def test_sqlite_text_that_is_not_utf8_is_a_problem_not_a_crash(
    store: Store, upstream: Upstream, database_url: str, column: str, raw: bytes, expected: str
) -> None:
    upstream.add_audience(AUDIENCE, "Awkward rows")
    upstream.add(AUDIENCE, "good-neighbour")
    values = {"user_id": "other-user", "anonymous_id": None, "email": None, column: raw}
    sqlite = sqlite3.connect(database_url.removeprefix("sqlite:///"))
    with sqlite:
        # Bytes stored as TEXT, as a careless upstream job could write them.
        sqlite.execute(
            "insert into audience_memberships (audience_id, user_id, anonymous_id, email) "
            "values (?, CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT))",
            (AUDIENCE, values["user_id"], values["anonymous_id"], values["email"]),
        )
        stored_as = sqlite.execute(
            f"select typeof({column}) from audience_memberships where {column} = CAST(? AS TEXT)",
            (raw,),
        ).fetchall()
        assert stored_as == [("text",)]
    sqlite.close()

    in_sql = problems_in_sql(store)

    assert in_sql.pop("good-neighbour") is None
    assert list(in_sql.values()) == [expected]
    # The row as the syncer reads it (undecodable bytes as lone surrogates) gets the same verdict.
    m = audience_memberships
    with store.engine.connect() as connection:
        row = connection.execute(
            select(m.c.user_id, m.c.anonymous_id, m.c.email).where(
                m.c.audience_id == AUDIENCE, m.c.user_id != "good-neighbour"
            )
        ).one()
    assert user_input_problem(row.user_id, row.anonymous_id, row.email) == expected
