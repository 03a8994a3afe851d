"""Every workflow's replica converges on the membership, whatever fails along the way.

Random sequences of membership changes and syncs, with two URLs of which one is down (503) or
fails part-way through some syncs. Each URL's replica is built only from what it accepted, in
arrival order, as a real workflow would build it. After every sync in which a URL was healthy,
its replica holds exactly the current members; nobody is ever told false who was never told
true; a retried change keeps its messageId; no messageId ever names two different changes.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncer.store import Store
from syncer.sync import SyncOptions
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream, run_sync

USERS = [f"u{n}" for n in range(8)]
# "ok": every request accepted; "down": every request answered 503; "flaky": the first
# ``allowed`` requests of the sync accepted, every later one answered 503.
MODES = ["ok", "down", "flaky"]

_examples = itertools.count()


@dataclass
class Workflow:
    """One URL of the stand-in, scripted per sync, and the replica of what it accepted."""

    path: str
    mode: str = "ok"
    allowed: int = 0
    answered: int = 0
    seen: int = 0
    replica: dict[str, bool] = field(default_factory=dict)
    # user -> (value, messageId, was the user a member when it was queued) of a change this URL
    # was sent but did not accept; its next attempt must carry the same messageId.
    unaccepted: dict[str, tuple[bool, str, bool]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, mode: str, allowed: int) -> None:
        with self._lock:
            self.mode, self.allowed, self.answered = mode, allowed, 0

    def __call__(self, _path: str, _body: bytes) -> Reply:
        with self._lock:
            self.answered += 1
            if self.mode == "ok" or (self.mode == "flaky" and self.answered <= self.allowed):
                return Reply(status=200)
            return Reply(status=503)


step_strategy = st.one_of(
    st.tuples(st.just("set"), st.frozensets(st.sampled_from(USERS))),
    st.tuples(st.just("sync"), st.sampled_from(MODES), st.integers(min_value=0, max_value=4)),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(step_strategy, min_size=1, max_size=6), unreliable=st.sampled_from([0, 1]))
def test_each_url_replica_matches_membership_after_every_healthy_sync(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    steps: list[tuple],
    unreliable: int,
) -> None:
    n = next(_examples)
    audience_id = f"prop_{n}"
    key = f"prop_{n}"
    upstream.add_audience(audience_id, f"Prop {n}")
    workflows = [Workflow(f"/prop{n}/a"), Workflow(f"/prop{n}/b")]
    for workflow in workflows:
        standin.respond(workflow.path, workflow)
    urls = [standin.url(workflow.path) for workflow in workflows]
    members: set[str] = set()
    message_ids: dict[str, tuple[str, bool]] = {}

    def sync(mode: str, allowed: int) -> None:
        for index, workflow in enumerate(workflows):
            workflow.script(mode if index == unreliable else "ok", allowed)
        report = run_sync(
            store, urls, SyncOptions(audience=audience_id), max_attempts=2, concurrency=3
        )
        for workflow in workflows:
            check_arrivals(workflow)
            if workflow.mode == "ok":
                told_true = {user for user, value in workflow.replica.items() if value}
                assert told_true == members, (
                    f"{workflow.path} after a healthy sync: replica {sorted(told_true)}, "
                    f"members {sorted(members)}"
                )
        if all(workflow.mode == "ok" for workflow in workflows):
            assert report.fully_delivered, report

    def check_arrivals(workflow: Workflow) -> None:
        # A change this URL was not told could only have been kept, with its messageId, if the
        # user's membership at planning time is still what it was when the change was queued.
        for user, (_value, _mid, was_member) in list(workflow.unaccepted.items()):
            if (user in members) != was_member:
                del workflow.unaccepted[user]
        arrivals = standin.received(workflow.path)[workflow.seen :]
        workflow.seen += len(arrivals)
        for arrival in arrivals:
            assert arrival.signature_ok
            message = arrival.message
            user, value, mid = message["userId"], message["traits"][key], message["messageId"]
            assert message_ids.setdefault(mid, (user, value)) == (user, value), (
                f"messageId {mid} used for {message_ids[mid]} and for {(user, value)}"
            )
            if not value:
                assert user in workflow.replica, (
                    f"{workflow.path} told {user} false out of the blue"
                )
            if user in workflow.unaccepted:
                earlier_value, earlier_mid, _ = workflow.unaccepted[user]
                assert (value, mid) == (earlier_value, earlier_mid), (
                    f"retry of {user}={earlier_value} at {workflow.path} came as {value} with "
                    f"messageId {mid}, first sent as {earlier_mid}"
                )
            if 200 <= arrival.status < 300:
                assert workflow.replica.get(user) != value, (
                    f"{workflow.path} was told {user}={value} again"
                )
                workflow.replica[user] = value
                workflow.unaccepted.pop(user, None)
            else:
                workflow.unaccepted[user] = (value, mid, user in members)

    for step in steps:
        if step[0] == "set":
            members = set(step[1])
            upstream.set_members(audience_id, members)
        else:
            sync(step[1], step[2])
    # Whatever happened before, one healthy sync brings both URLs in line...
    sync("ok", 0)
    # ...after which there is nothing left to tell anyone.
    told_so_far = [workflow.seen for workflow in workflows]
    sync("ok", 0)
    for workflow, count in zip(workflows, told_so_far, strict=True):
        assert workflow.seen == count, f"{workflow.path} was sent needless messages"
