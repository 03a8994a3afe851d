"""A user deleted while the outcome of a change about them is being recorded is not remembered.

``syncer delete-user`` (:meth:`DeletionStore.suppress`, "D") locks the user's queued changes
``FOR UPDATE`` first, records the deletion, forgets what each URL was told about the user
(``syncer_state``) and drops the changes nobody is sending; a change in flight keeps its row
until its outcome is recorded. A worker recording a delivery (:meth:`OutboxStore.exchange`,
"E") takes the rows its claim still owns, records what the URL was told, and then removes what
it just wrote about users found deleted.

The race, on PostgreSQL: D has locked the user's claimed row; E's ``DELETE ... RETURNING``
waits for that lock; D commits; E's DELETE goes on (the row is unchanged, still E's claim) and
upserts ``syncer_state`` for the user. Had E looked up ``syncer_deleted_users`` in that same
statement, it would have read the snapshot taken before D committed, missed the deletion, and
left a record of what a deleted user was told: a privacy leak no later run repairs (D has
already forgotten the user and will not run again). The look-up is a separate statement, with a
fresh READ COMMITTED snapshot that sees D's commit, in both ways an exchange runs on PostgreSQL:
the ``syncer_exchange`` function of migration 0007 (every outcome a delivery, no pacing) and the
statements sent from Python (anything else). The first test makes that interleaving happen, on
the real ``suppress``, held just before its COMMIT; the second is the plain order (deleted
after the claim, before the delivery is recorded), on every database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection, make_url

from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.core.payload import message_id
from syncer.store import Store
from syncer.store.claims import Claim
from syncer.store.database import create_database_engine
from syncer.store.deletions import DeletionStore
from syncer.store.outbox import Exchanged
from syncer.store.sql import utcnow
from tests.conftest import Upstream
from tests.integration.fault_support import query, wait_until
from tests.integration.test_fencing import exchange, plan_pair

AUDIENCE = "aud_exchange_race"
URL = "http://127.0.0.1:9/wf"  # never sent to: the tests drive the store directly
DELIVERED = Outcome(OutcomeKind.DELIVERED, 200, "", 1)
DELETED = "user-deleted"
KEPT = ["user-kept-1", "user-kept-2"]
CLAIM_TTL = 600.0  # the claim never runs out during a test: only the race decides
# How long a test waits for something that must happen (a lock wait, a thread to finish).
PATIENCE_SECONDS = 30
# Rate 0: the exchange is one call of syncer_exchange. Any rate: the statements sent from
# Python (no slot is reserved: the exchanges under test claim nothing).
PATHS = {"in_database": 0.0, "from_python": 1000.0}


def claim_everyone(store: Store, upstream: Upstream, claim: Claim) -> tuple[int, dict[str, int]]:
    """The deleted user and the kept ones join the audience, the pair is planned, and ``claim``
    takes every change; return the URL's id and each user's change id."""
    upstream.add_audience(AUDIENCE, "Deleted While Recorded")
    upstream.add(AUDIENCE, DELETED, *KEPT)
    destination_id = plan_pair(store, URL, AUDIENCE)
    claimed = exchange(store, claim, destination_id, want=10, audience=AUDIENCE).claimed
    change_ids = {change.user_id: change.change_id for change in claimed}
    assert sorted(change_ids) == sorted([DELETED, *KEPT])
    return destination_id, change_ids


def told_users(engine: Engine) -> list[str]:
    return [user for (user,) in query(engine, "select user_id from syncer_state order by 1")]


class InThread:
    """One call run in a thread of this process; its result or error kept for the test."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as error:
            self.error = error

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join(PATIENCE_SECONDS)

    def wait(self, what: str) -> Any:
        self.join()
        assert self.done, f"{what} still runs after {PATIENCE_SECONDS}s"
        assert self.error is None, f"{what} failed: {type(self.error).__name__}: {self.error}"
        return self.result


class DeleteUserHeldOpen:
    """``DeletionStore.suppress`` (what ``syncer delete-user`` runs), on an engine of its own,
    in a thread, stopped just before its COMMIT until :meth:`commit`: every statement has run
    and every lock it took is held."""

    def __init__(self, database_url: str, user_ids: list[str], destination_ids: list[int]) -> None:
        self.backend_pid: int | None = None
        self._engine = create_database_engine(database_url)
        self._before_commit = threading.Event()
        self._release = threading.Event()
        event.listen(self._engine, "commit", self._hold)
        deletions = DeletionStore(self._engine)
        self._run = InThread(lambda: deletions.suppress(user_ids, destination_ids, utcnow()))

    def _hold(self, connection: Connection) -> None:
        if self._before_commit.is_set():
            return
        psycopg_connection: Any = connection.connection.dbapi_connection
        self.backend_pid = int(psycopg_connection.info.backend_pid)
        self._before_commit.set()
        # Bounded: a failed test lets it go (see close); the COMMIT follows either way.
        self._release.wait(PATIENCE_SECONDS)

    def wait_until_holding(self) -> int:
        """Wait until every statement has run; return the session's backend pid."""
        wait_until(
            lambda: self._before_commit.is_set() or self._run.done,
            PATIENCE_SECONDS,
            "delete-user to run its statements",
        )
        assert self._before_commit.is_set(), f"delete-user ended early: {self._run.error!r}"
        assert self.backend_pid is not None
        return self.backend_pid

    def commit(self) -> None:
        self._release.set()
        self._run.wait("delete-user")

    def close(self) -> None:
        """Let it go, whatever happened (a failed test's error is the one to show)."""
        self._release.set()
        self._run.join()
        self._engine.dispose()


def sessions_waiting_for(engine: Engine, pid: int) -> list[str]:
    """The statements of the sessions waiting for a lock that backend ``pid`` holds."""
    return [
        statement
        for (statement,) in query(
            engine,
            "select query from pg_stat_activity where wait_event_type = 'Lock' "
            "and :pid = any(pg_blocking_pids(pid))",
            pid=pid,
        )
    ]


def logged_users(engine: Engine) -> list[str]:
    """The users the change log has entries about."""
    return [
        user
        for (user,) in query(engine, "select distinct user_id from syncer_change_log order by 1")
    ]


@pytest.mark.postgres
@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_delete_user_committed_while_a_delivery_waits_for_its_lock_leaves_nothing_told(
    store: Store, upstream: Upstream, database_url: str, path: str
) -> None:
    """D holds the deleted user's claimed row (and has forgotten the user) when E records the
    delivery of all three changes; E waits for the row; D commits; E takes the row. E must then
    see D's commit: the kept users are recorded, the deleted one is not."""
    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.skip(
            "PostgreSQL only: on SQLite every writer takes the database's write lock at BEGIN, "
            "so an exchange and a delete-user cannot interleave"
        )
    engine = store.engine
    rate = PATHS[path]
    claim = Claim.new("host-a:1:a", CLAIM_TTL)
    destination_id, change_ids = claim_everyone(store, upstream, claim)
    deleting = DeleteUserHeldOpen(database_url, [DELETED], [destination_id])
    try:
        holder = deleting.wait_until_holding()
        recording = InThread(
            lambda: exchange(
                store,
                claim,
                destination_id,
                results=[(change_id, DELIVERED) for change_id in change_ids.values()],
                want=10,
                audience=AUDIENCE,
                rate=rate,
            )
        )
        waiting = wait_until(
            lambda: sessions_waiting_for(engine, holder) or recording.done,
            PATIENCE_SECONDS,
            "the exchange to wait for delete-user's lock on the user's claimed row",
        )
        assert not recording.done, (
            "the exchange did not wait for delete-user's lock: the race this test stages did "
            f"not happen (result {recording.result!r}, error {recording.error!r})"
        )
        statement = " ".join(waiting[0].split()).lower()
        if path == "in_database":
            assert "syncer_exchange" in statement, waiting
        else:
            assert statement.startswith("delete from syncer_outbox"), waiting
        deleting.commit()
    finally:
        deleting.close()
    recorded: Exchanged = recording.wait("the exchange")

    assert (recorded.lost, recorded.claimed, recorded.held) == (0, [], False)
    # What was told about the deleted user is forgotten; what the others were told is kept.
    assert told_users(engine) == KEPT
    assert logged_users(engine) == KEPT  # the change log forgets them too
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]
    assert query(engine, "select user_id from syncer_deleted_users") == [(DELETED,)]
    assert store.deletions.owed_count(destination_id) == 1


def test_a_user_deleted_after_the_claim_is_not_recorded_when_the_delivery_is(
    store: Store, upstream: Upstream
) -> None:
    """Deleted (committed) between the claim and the record of the delivery: the change in
    flight keeps its row until then, and its delivery writes nothing about the user."""
    engine = store.engine
    claim = Claim.new("host-a:1:a", CLAIM_TTL)
    destination_id, change_ids = claim_everyone(store, upstream, claim)
    store.deletions.suppress([DELETED], [destination_id], utcnow())
    # The change in flight stays until its outcome is in (the delete to the URL waits for it).
    assert query(engine, "select count(*) from syncer_outbox where user_id = :u", u=DELETED) == [
        (1,)
    ]

    recorded = exchange(
        store,
        claim,
        destination_id,
        results=[(change_id, DELIVERED) for change_id in change_ids.values()],
        want=10,
        audience=AUDIENCE,
    )

    assert (recorded.lost, recorded.claimed, recorded.held) == (0, [], False)
    told = query(engine, "select user_id, value, message_id from syncer_state order by user_id")
    assert told == [(user, "true", message_id(store.namespace, change_ids[user])) for user in KEPT]
    assert logged_users(engine) == KEPT
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]
    assert store.deletions.owed_count(destination_id) == 1
