"""One (URL, audience) in one run: plan it, then send what is claimable, fenced by the claim."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

import structlog

from syncer.core.outcomes import Outcome, OutcomeKind, settle_calls
from syncer.core.payload import Computation
from syncer.core.states import Call, ChangeStatus, PairState
from syncer.core.traits import Subject
from syncer.delivery.claims import Outgoing, paced
from syncer.delivery.sender import UrlSender
from syncer.store.planning import PlanOutcome, PlanResult
from syncer.store.sql import utcnow
from syncer.sync.claiming import send_under
from syncer.sync.context import Progress, RunContext, holder_is_dead
from syncer.sync.exchanging import ExchangeRequest, OwedCall
from syncer.sync.reports import PairReport

log = structlog.get_logger("syncer.sync")

# While another worker holds some of a pair's changes, a worker that has run out of changes to
# claim looks again this often: it takes over what is released or runs out, and ends when the
# pair's outbox is empty (or holds only what waits for the next run).
JOIN_POLL_SECONDS = 0.25

# A pair whose changes went stale between plan and send (upstream changed meanwhile) is planned
# once more in the same run; anything still left then waits for the next run.
PLAN_ROUNDS = 2


async def plan_pair(
    context: RunContext,
    url: str,
    destination_id: int,
    subject: Subject,
    *,
    full: bool,
    first_round: bool,
    from_query: bool = False,
) -> PlanResult:
    """One plan of one (URL, audience or trait): the first of a run, or the one after a stale
    send. New changes take the call the URL's ``send`` names now."""
    return await context.db(
        context.store.planning.plan,
        destination_id,
        subject.id,
        full=full and first_round,
        now=utcnow(),
        limits=context.guard_limits,
        retry_rejected=first_round,
        resend_on_identity_change=context.settings.engage.resend_on_identity_change,
        call=context.settings.tray.workflow(url).send,
        kind=subject.kind,
        from_query=from_query,
    )


async def sync_pair(
    context: RunContext,
    sender: UrlSender,
    destination_id: int,
    subject: Subject,
    key: str,
    *,
    full: bool,
    progress: Progress,
    from_query: bool = False,
    run_id: int | None = None,
    first_plan: Awaitable[PlanResult] | None = None,
    planned: Callable[[], None] = lambda: None,
) -> PairReport:
    """Plan one (URL, audience) and deliver its outbox; report what happened.

    ``first_plan``: the run's first plan of the pair, already under way (see
    :func:`syncer.sync.engine.SyncEngine._sync_url`); ``planned`` is called once the first plan
    is in, before anything is sent.
    """
    store = context.store
    audience_id = subject.id
    report = PairReport(url=sender.url, audience_id=audience_id, key=key, kind=subject.kind)
    for round_number in range(PLAN_ROUNDS):
        if round_number == 0 and first_plan is not None:
            plan = await first_plan
        else:
            plan = await plan_pair(
                context,
                sender.url,
                destination_id,
                subject,
                full=full,
                first_round=round_number == 0,
                from_query=from_query,
            )
        if round_number == 0:
            planned()
        if plan.outcome is PlanOutcome.HELD:
            report.state = PairState.HELD
            report.note = (
                f"held: {plan.hold_reason}; check upstream, then `syncer approve {key}` "
                "to send the exits"
            )
            log.warning(
                "pair_held", url=sender.url, audience_id=audience_id, reason=plan.hold_reason
            )
            break
        report.entered += plan.new_entered
        report.exited += plan.new_exited
        report.invalid, report.invalid_example = plan.invalid, plan.invalid_example
        if round_number == 0:
            progress.planned(sender.url, plan.queued_entries + plan.queued_exits)
            context.expect_delivery(plan.queued_entries + plan.queued_exits)
        else:
            progress.planned(sender.url, plan.new_entered + plan.new_exited)
        deliver = partial(
            _deliver,
            context,
            sender,
            destination_id,
            subject,
            key,
            report,
            progress,
            from_query,
            run_id,
        )
        await deliver()
        await _wait_for_other_workers(context, sender, destination_id, subject, report, deliver)
        statuses = await context.db(
            store.outbox.status_counts, destination_id, audience_id, subject.kind
        )
        report.pending = statuses.get(ChangeStatus.PENDING, 0)
        report.rejected = statuses.get(ChangeStatus.REJECTED, 0)
        report.parked = statuses.get(ChangeStatus.PARKED, 0)
        if not report.pending or sender.unavailable or report.state is not PairState.DONE:
            break
    if report.invalid:
        log.warning(
            "invalid_rows_skipped",
            url=sender.url,
            audience_id=audience_id,
            count=report.invalid,
            example=report.invalid_example,
        )
    _settle_state(report, sender)
    return report


async def _wait_for_other_workers(
    context: RunContext,
    sender: UrlSender,
    destination_id: int,
    subject: Subject,
    report: PairReport,
    deliver: Callable[[], Awaitable[None]],
) -> None:
    """Stay on the pair while other workers hold some of its changes: what they release, or
    what their dead claims let go of, is ours to ``deliver``; their answers settle the rest."""
    store = context.store
    while report.state is PairState.DONE and not sender.unavailable:
        others = await context.db(
            store.outbox.claimed_elsewhere, destination_id, subject.id, subject.kind
        )
        if not others:
            if report.joined:  # what ran out or was let go of since the last pass is ours now
                await deliver()
            return
        if not report.joined:
            report.joined = True
            log.info("pair_shared", url=sender.url, audience_id=subject.id, held_by_others=others)
        await context.db(store.claims.release_dead, holder_is_dead)
        await asyncio.sleep(JOIN_POLL_SECONDS)
        await deliver()


class CallSettler:
    """Turns the answers to single calls into each change's outcome, once every call it owes
    is answered: a change sent both ways makes two requests, which may be answered in different
    exchanges, and its row must not be recorded on the first answer while the second is in
    flight. Every claimed request is answered in the end (or cut off, or unsent), so nothing
    waits here for ever; an answer handed in again (after a failed exchange) replaces itself.
    """

    def __init__(self) -> None:
        self._waiting: dict[int, dict[Call, Outcome]] = {}

    def settle(
        self, answers: list[tuple[OwedCall, Outcome]]
    ) -> tuple[list[tuple[int, Outcome]], list[tuple[int, Call]]]:
        """The outcomes of the changes now fully answered, and those of which the URL accepted
        one call of two (not to be sent again)."""
        results: list[tuple[int, Outcome]] = []
        half_done: list[tuple[int, Call]] = []
        for owed, outcome in answers:
            change_id = owed.change.change_id
            if owed.change.call is not Call.BOTH:  # one call: its answer is the change's
                results.append((change_id, outcome))
                continue
            calls = self._waiting.setdefault(change_id, {})
            calls[owed.call] = outcome
            if len(calls) < len(owed.change.calls):
                continue
            del self._waiting[change_id]
            settled, accepted = settle_calls(list(calls.items()))
            results.append((change_id, settled))
            if accepted is not None:
                half_done.append((change_id, accepted))
        return results, half_done


def _settle_state(report: PairReport, sender: UrlSender) -> None:
    if report.state is not PairState.DONE:
        return
    if sender.refused is not None:
        report.state, report.note = PairState.URL_REFUSED, sender.refused.detail
    elif sender.down:
        report.state = PairState.URL_DOWN
        report.note = "URL unavailable this run; changes kept for the next run"
    elif sender.gate_closed:
        report.state = PairState.CLAIM_LOST
        report.note = "stopped sending: the database could not renew our claim"
    elif sender.stopped and report.pending:
        report.state, report.note = PairState.STOPPED, "stopped; changes kept for the next run"
    elif report.pending or report.rejected:
        report.state = PairState.PENDING


async def _deliver(
    context: RunContext,
    sender: UrlSender,
    destination_id: int,
    subject: Subject,
    key: str,
    report: PairReport,
    progress: Progress,
    from_query: bool,
    run_id: int | None,
) -> None:
    delivery = context.settings.delivery
    audience_id = subject.id
    computation = Computation(
        subject.kind.value, audience_id, key, context.settings.engage.space_id
    )
    keeper = context.claim_keeper()
    claim = keeper.claim
    cursor = 0
    settler = CallSettler()

    async def exchange(
        answers: list[tuple[OwedCall, Outcome]], want: int
    ) -> list[Outgoing[OwedCall]]:
        nonlocal cursor
        if want:
            keeper.starting()
        results, half_done = settler.settle(answers)
        exchanged = await context.exchange(
            ExchangeRequest(
                claim,
                destination_id,
                computation,
                results=results,
                want=want,
                after_id=cursor,
                now=utcnow(),
                max_rejections=delivery.max_rejections,
                rate_per_second=delivery.rate_limit_per_second,
                clear_refusal=not sender.refusal_cleared,
                secret=context.settings.tray.secret_for(sender.url),
                half_done=half_done,
                from_query=from_query,
                run_id=run_id,
            )
        )
        if any(outcome.kind is OutcomeKind.DELIVERED for _, outcome in results):
            sender.refusal_cleared = True
        if exchanged.lost:
            keeper.mark_lost()
            report.state = PairState.CLAIM_LOST
            report.note = "stopped: another worker took over our claim; it sends the rest"
            log.error("claim_lost", url=sender.url, audience_id=audience_id, refused=exchanged.lost)
        if exchanged.held:
            report.state = PairState.HELD
            report.note = "held by the mass-exit guard while sending"
        report.delivered += sum(1 for _, o in results if o.kind is OutcomeKind.DELIVERED)
        progress.advanced(sender.url, len(results))
        if exchanged.claimed:
            cursor = exchanged.claimed[-1][0].change.change_id
        return paced(exchanged.claimed, exchanged.slots, asyncio.get_running_loop().time())

    await send_under(keeper, sender, exchange, concurrency=delivery.concurrency)
