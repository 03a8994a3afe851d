"""The ``syncer`` command: one entry point, one error handler, documented exit statuses.

Exit statuses: 0 success; 1 some changes were not delivered (they stay queued); 2 invalid
settings or usage; 3 database unreachable or not migrated; 4 internal error.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from syncer.core.states import Call, Kind, PairState
from syncer.core.traits import Subject
from syncer.core.urls import canonical_url, configured_url
from syncer.errors import (
    EXIT_DATABASE,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_UNDELIVERED,
    EXIT_USAGE,
    ConfigError,
    SyncerError,
)
from syncer.logs import configure_logging
from syncer.render import print_json, print_table
from syncer.settings import Settings, load_settings, resolve_settings_path
from syncer.store import Store
from syncer.store.database import check_schema, create_database_engine, migrate, safe_url
from syncer.store.inspection import Inspection
from syncer.store.sql import utcnow

if TYPE_CHECKING:
    # The engine (aiohttp, uvloop) is loaded only by the commands that send: `inspect` and the
    # other read-only commands start a fifth faster without it.
    from syncer.sync import SyncEngine, SyncOptions, SyncReport

log = structlog.get_logger("syncer.cli")


@dataclass
class App:
    """What every command shares: the settings, loaded and validated once."""

    settings_path: Path
    _settings: Settings | None = field(default=None, init=False)
    _engines: list[Engine] = field(default_factory=list, init=False)

    @property
    def settings(self) -> Settings:
        """The validated settings (read on first use, before anything else happens)."""
        if self._settings is None:
            self._settings = load_settings(self.settings_path)
            configure_logging(self._settings.logging.level, self._settings.logging.format)
        return self._settings

    def engine(self) -> Engine:
        """A connection pool to the configured database, closed when the command ends."""
        engine = create_database_engine(self.settings.database.url)
        self._engines.append(engine)
        return engine

    def store(self) -> Store:
        """The store of the configured database, checked to be migrated by this version."""
        engine = self.engine()
        check_schema(engine)
        return Store.open(engine)

    def close(self) -> None:
        """Close the database connections the command opened."""
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()


@click.group()
@click.option(
    "--settings",
    "settings_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Settings file (default: $SYNCER_SETTINGS, else ./settings.toml).",
)
@click.version_option(package_name="engage-audience-syncer")
@click.pass_context
def main(ctx: click.Context, settings_path: Path | None) -> None:
    """Sync Engage audience memberships and computed traits to Tray.io workflows."""
    configure_logging()
    app = App(resolve_settings_path(str(settings_path) if settings_path else None))
    ctx.obj = app
    ctx.call_on_close(app.close)


@main.command(name="migrate")
@click.pass_obj
def migrate_command(app: App) -> None:
    """Create or upgrade the database schema (input tables and the syncer's own)."""
    settings = app.settings
    before, after = migrate(app.engine())
    where = safe_url(settings.database.url)
    if before == after:
        click.echo(f"{where}: schema already at revision {after}")
    else:
        click.echo(f"{where}: schema migrated from {before or 'nothing'} to revision {after}")


class _RateColumn(ProgressColumn):
    """Changes per second, over the last seconds while running, overall once finished."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-/s" if speed is None else f"{speed:,.0f}/s")


def _bars() -> Progress:
    """One bar per URL on standard error: done/total, rate, time left and time taken. Log lines
    are printed above the bars (see syncer.logs), and the bars stay once the run is over."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


class _BarProgress:
    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, Any] = {}

    def _task(self, url: str) -> Any:
        if url not in self._tasks:
            self._tasks[url] = self._progress.add_task(url, total=0)
        return self._tasks[url]

    def planned(self, url: str, changes: int) -> None:
        task = self._task(url)
        total = self._progress.tasks[task].total or 0
        self._progress.update(task, total=total + changes)

    def advanced(self, url: str, changes: int) -> None:
        self._progress.advance(self._task(url), changes)

    def finish(self, report: SyncReport) -> None:
        """End the bar of each URL left with nothing owed at 100%: changes planned once and
        settled by a second plan in the run count twice in the total."""
        for url, task in self._tasks.items():
            pairs = [pair for pair in report.pairs if pair.url == url]
            if all(pair.state is PairState.DONE and not pair.pending for pair in pairs):
                self._progress.update(task, completed=self._progress.tasks[task].total)


def _print_summary(report: SyncReport) -> None:
    counts = report.counts
    click.echo(
        f"run {report.run_id}: {counts.audiences} audience(s) and trait(s) x "
        f"{len({p.url for p in report.pairs})} URL(s): {counts.entered} entered, "
        f"{counts.exited} exited, {counts.delivered} delivered, {counts.pending} pending, "
        f"{counts.rejected} rejected, {counts.parked} parked in {report.duration_seconds:.2f}s"
    )
    for problem in report.problems:
        click.echo(f"  skipped {problem.subject}: {problem.reason}")
    for pair in report.pairs:
        if pair.state is PairState.HELD:
            click.echo(f"  HELD {pair.url} {pair.key}: {pair.note}")
            continue
        if pair.invalid:
            click.echo(
                f"  {pair.url} {pair.key}: {pair.invalid} {_rows(pair.kind)} cannot be sent and "
                f"were not queued (e.g. {pair.invalid_example}); fix them upstream"
            )
        if pair.parked:
            click.echo(
                f"  {pair.url} {pair.key}: {pair.parked} change(s) parked after repeated "
                "rejections: see `syncer inspect failures`, then `syncer retry`"
            )
        if pair.pending or pair.rejected or pair.state is not PairState.DONE:
            note = f" ({pair.note})" if pair.note else ""
            click.echo(
                f"  {pair.url} {pair.key}: {pair.pending} pending, {pair.rejected} rejected{note}"
            )
    for deletion in report.deletions:
        if deletion.pending or deletion.note:
            note = f" ({deletion.note})" if deletion.note else ""
            click.echo(f"  {deletion.url}: {deletion.pending} delete(s) pending{note}")
    for removed in report.removed_urls:
        click.echo(
            f"  {removed.url} is no longer configured but is owed {removed.owed_deletes} "
            "delete(s): configure it again, or `syncer forget-url URL --yes` to drop them"
        )
    if not report.fully_delivered:
        click.echo("  undelivered changes stay queued and are retried on the next run")


@main.command(name="sync")
@click.option(
    "--audience", default=None, help="Sync only this audience or computed trait (id or key)."
)
@click.option(
    "--url",
    default=None,
    help="Sync only this configured workflow URL (with --full: re-send it the current state).",
)
@click.option(
    "--full",
    is_flag=True,
    help="Re-send every current member and trait value, whatever was sent before.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be sent, per URL; change nothing.")
@click.pass_obj
def sync_command(
    app: App, audience: str | None, url: str | None, full: bool, dry_run: bool
) -> None:
    """Run one sync over all enabled audiences and computed traits (or one), to every
    configured URL (or one)."""
    from syncer.sync import SyncEngine, SyncOptions

    settings = app.settings
    only_url = None if url is None else _known_url(app, url)
    engine = SyncEngine(settings, app.store())
    options = SyncOptions(
        audience=audience,
        url=only_url,
        full=full,
        dry_run=dry_run,
        trigger="full" if full else "manual",
    )
    try:
        if dry_run:
            _dry_run(engine, options)
            return
        if sys.stderr.isatty():
            with _bars() as bar:
                bars = _BarProgress(bar)
                report = engine.run(options, progress=bars)
                bars.finish(report)
        else:
            report = engine.run(options)
    finally:
        engine.close()
    _print_summary(report)
    sys.exit(EXIT_OK if report.fully_delivered else EXIT_UNDELIVERED)


def _dry_run(engine: SyncEngine, options: SyncOptions) -> None:
    totals: dict[tuple[str, str], int] = {}
    current_url: list[str] = []

    def emit(url: str, key: str, user_id: str, value: str, call: Call) -> None:
        if not current_url or current_url[0] != url:
            current_url[:] = [url]
            click.echo(f"would send to {url}:")
        totals[(url, value)] = totals.get((url, value), 0) + 1
        click.echo(f"  {call} {user_id!r} {key}={value}")

    report = engine.run(options, emit=emit)
    for problem in report.problems:
        click.echo(f"skipped {problem.subject}: {problem.reason}")
    for pair in report.pairs:
        if pair.state is PairState.HELD:
            click.echo(f"would HOLD {pair.url} {pair.key}: {pair.note}")
        if pair.invalid:
            click.echo(
                f"{pair.url} {pair.key}: {pair.invalid} {_rows(pair.kind)} cannot be sent "
                f"(e.g. {pair.invalid_example})"
            )
    for url in options.urls(engine.settings.tray.urls):
        entered, exited = totals.pop((url, "true"), 0), totals.pop((url, "false"), 0)
        nulls = totals.pop((url, "null"), 0)
        values = sum(n for (where, _), n in totals.items() if where == url)
        traits = f", {values} trait value(s), {nulls} null(s)" if values or nulls else ""
        click.echo(
            f"dry run: {url}: {entered} entered, {exited} exited{traits}; "
            "nothing was sent or changed"
        )


def _rows(kind: Kind) -> str:
    return "member row(s)" if kind is Kind.AUDIENCE else "trait value row(s)"


@main.command(name="replay")
@click.option("--run", "run_id", type=int, required=True, help="The run to replay (its id).")
@click.option("--to", "to_url", required=True, help="The workflow URL to send the copies to.")
@click.option(
    "--from",
    "from_url",
    default=None,
    help="Replay what the run delivered to this URL (default: the run's first URL).",
)
@click.option("--dry-run", is_flag=True, help="Count what would be sent; send nothing.")
@click.pass_obj
def replay_command(app: App, run_id: int, to_url: str, from_url: str | None, dry_run: bool) -> None:
    """Send again, to --to, exactly what run --run delivered to --from: the same bytes, the
    same messageIds and timestamps, signed for --to. A copy: no URL's state changes. Users
    deleted since are skipped. Exit 0 when every payload was accepted, 1 otherwise."""
    from syncer.sync import SyncEngine

    for option, url in (("--to", to_url), ("--from", from_url)):
        if url is not None and not _is_workflow_url(url):
            raise ConfigError(f"{option}: {url!r} is not an http:// or https:// URL")
    engine = SyncEngine(app.settings, app.store())
    try:
        if sys.stderr.isatty() and not dry_run:
            with _bars() as bar:
                report = engine.replay(run_id, to_url, from_url, progress=_BarProgress(bar))
        else:
            report = engine.replay(run_id, to_url, from_url, dry_run=dry_run)
    finally:
        engine.close()
    skipped = (
        f"; {report.skipped_deleted} about users deleted since, skipped"
        if report.skipped_deleted
        else ""
    )
    if dry_run:
        click.echo(
            f"dry run: run {run_id} delivered {report.payloads} payload(s) to "
            f"{report.from_url}: would send them to {report.to_url}{skipped}"
        )
        return
    failed = ", ".join(f"{n} {kind}" for kind, n in sorted(report.not_accepted.items()))
    click.echo(
        f"replayed run {run_id} from {report.from_url} to {report.to_url}: "
        f"{report.accepted} of {report.payloads} payload(s) accepted"
        + (f", not accepted: {failed} (first: {report.first_problem})" if failed else "")
        + f"{skipped} in {report.duration_seconds:.2f}s"
    )
    sys.exit(EXIT_OK if report.complete else EXIT_UNDELIVERED)


def _is_workflow_url(url: str) -> bool:
    try:
        canonical_url(url)
    except ValueError:
        return False
    return True


@main.command(name="delete-user")
@click.argument("user_ids", nargs=-1, required=True)
@click.pass_obj
def delete_user_command(app: App, user_ids: tuple[str, ...]) -> None:
    """Forward privacy deletions for USER_IDS to every workflow URL, and suppress the users.

    Nothing more is ever sent about a deleted user, and the syncer forgets what it told the
    workflows about them. A URL that does not accept the delete now gets it on a later run.
    """
    blank = [user_id for user_id in user_ids if not user_id.strip()]
    if blank:
        raise ConfigError("USER_ID: a user id cannot be empty")
    from syncer.sync import SyncEngine

    engine = SyncEngine(app.settings, app.store())
    try:
        report = engine.delete_users(list(dict.fromkeys(user_ids)))
    finally:
        engine.close()
    for deletion in report.deletions:
        state = "all delivered" if not deletion.pending else f"{deletion.pending} pending"
        click.echo(f"{deletion.url}: {deletion.delivered} delete(s) delivered, {state}")
    if not report.fully_delivered:
        click.echo("  undelivered deletes stay queued and are retried on the next run")
    sys.exit(EXIT_OK if report.fully_delivered else EXIT_UNDELIVERED)


@main.command(name="retry")
@click.option("--url", default=None, help="Only changes for this workflow URL.")
@click.option(
    "--audience", default=None, help="Only changes of this audience or trait (id or key)."
)
@click.pass_obj
def retry_command(app: App, url: str | None, audience: str | None) -> None:
    """Put rejected and parked changes back in line for the next run."""
    store = app.store()
    destination_ids = None if url is None else _configured_destination(app, store, url)
    subject = None
    if audience is not None:
        subject = _find(app, store, audience, "--audience")
        if subject is None:
            raise ConfigError(
                f"--audience: no audience or computed trait has the id or key {audience!r}"
            )
    count = store.outbox.requeue(destination_ids, subject)
    click.echo(f"{count} change(s) re-queued; they are sent on the next run")


def _find(app: App, store: Store, wanted: str, option: str) -> Subject | None:
    """The audience or trait (of the input tables or the settings) named by id or key."""
    from syncer.sync import query_defined

    return store.audiences.find(wanted, query_defined(app.settings), option)


def _configured_destination(app: App, store: Store, url: str) -> list[int]:
    """The destination id of ``--url``, which must be one of the configured URLs."""
    return list(store.destinations.find([_known_url(app, url)]).values())


def _known_url(app: App, url: str) -> str:
    """``--url`` as configured: it must be one of tray.workflow_urls (in any spelling of it)."""
    known = configured_url(app.settings.tray.urls, url)
    if known is None:
        raise ConfigError(f"--url: {url!r} is not one of tray.workflow_urls")
    return known


@main.command(name="approve")
@click.argument("audience")
@click.option("--url", default=None, help="Release it for this workflow URL only.")
@click.pass_obj
def approve_command(app: App, audience: str, url: str | None) -> None:
    """Release an AUDIENCE (id or key) held by the mass-exit guard: its exits go out next run.
    AUDIENCE may also name a computed trait held for the nulls it would send.

    The guard holds an audience per URL; this releases it for every URL that holds it, or
    with --url for that one.
    """
    store = app.store()
    subject = _find(app, store, audience, "AUDIENCE")
    if subject is None:
        raise ConfigError(f"AUDIENCE: no audience or computed trait has the id or key {audience!r}")
    destination_ids = None if url is None else _configured_destination(app, store, url)
    approved = store.holds.approve(subject, destination_ids, utcnow())
    if not approved:
        where = "" if url is None else f" for {url}"
        raise ConfigError(f"AUDIENCE: {subject} is not held{where}")
    what = "exits" if subject.kind is Kind.AUDIENCE else "nulls"
    click.echo(
        f"{subject.kind} {subject.id} approved for {approved} URL(s): "
        f"its {what} are sent on the next run"
    )


@main.command(name="forget-url")
@click.argument("url")
@click.option("--yes", is_flag=True, help="Confirm: this cannot be undone.")
@click.pass_obj
def forget_url_command(app: App, url: str, yes: bool) -> None:
    """Drop for good everything kept for a workflow URL no longer configured: what it was told,
    changes queued for it, and the privacy deletes it is still owed."""
    try:
        canonical = canonical_url(url)
    except ValueError as error:
        raise ConfigError(f"URL: {error}") from None
    if canonical in {canonical_url(u) for u in app.settings.tray.urls}:
        raise ConfigError(f"URL: {url!r} is configured in tray.workflow_urls: remove it first")
    if not yes:
        raise ConfigError("forget-url drops owed deletes for good: add --yes to confirm")
    forgotten = app.store().destinations.forget(url)
    if forgotten is None:
        raise ConfigError(f"URL: the database knows no workflow at {url!r}")
    log.warning(
        "url_forgotten",
        url=forgotten.url,
        state_rows=forgotten.state_rows,
        queued_changes=forgotten.queued_changes,
        owed_deletes=forgotten.owed_deletes,
    )
    click.echo(
        f"forgot {forgotten.url}: {forgotten.state_rows} told value(s), "
        f"{forgotten.queued_changes} queued change(s), {forgotten.owed_deletes} owed delete(s)"
    )


@main.command(name="daemon")
@click.pass_obj
def daemon_command(app: App) -> None:
    """Sync now, then on the [schedule], until SIGTERM or SIGINT (exit status 0).

    Settings are read once at start: restart the daemon for changes to take effect.
    """
    from syncer.daemon import Daemon  # APScheduler is loaded only by the command that uses it
    from syncer.sync import SyncEngine

    settings = app.settings
    engine = SyncEngine(settings, app.store())
    try:
        code = Daemon(settings, engine).serve()
    finally:
        engine.close()
    sys.exit(code)


FORMAT_OPTION = click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Aligned table for people, or JSON for scripts.",
)


@main.group(name="inspect")
def inspect_group() -> None:
    """Look at audiences, traits, members, users, runs and failures."""


def _inspection(app: App) -> Inspection:
    from syncer.sync import query_defined

    return Inspection(app.store(), query_defined(app.settings))


@inspect_group.command(name="audiences")
@FORMAT_OPTION
@click.pass_obj
def inspect_audiences(app: App, output_format: str) -> None:
    """Every audience, its members, and per URL what it was told and what is pending.

    An audience defined by a query in the settings counts the members of its last evaluation.
    """
    records = _inspection(app).audiences(app.settings.tray.urls)
    _print_subjects(
        records,
        output_format,
        [("MEMBERS", "members"), ("INVALID", "invalid_members")],
        [("TOLD", "told_members"), ("PENDING IN", "pending_entries"),
         ("PENDING OUT", "pending_exits")],
    )  # fmt: skip


@inspect_group.command(name="traits")
@FORMAT_OPTION
@click.pass_obj
def inspect_traits(app: App, output_format: str) -> None:
    """Every computed trait, its values, and per URL what it holds and what is pending.

    A trait defined by a query in the settings counts the values of its last evaluation.
    """
    records = _inspection(app).traits(app.settings.tray.urls)
    _print_subjects(
        records,
        output_format,
        [("VALUES", "values"), ("INVALID", "invalid_values")],
        [("TOLD", "told_values"), ("PENDING", "pending_values"), ("PENDING NULL", "pending_nulls")],
    )


def _print_subjects(
    records: list[dict[str, Any]],
    output_format: str,
    counts: list[tuple[str, str]],
    per_url_counts: list[tuple[str, str]],
) -> None:
    if output_format == "json":
        print_json(records)
        return
    own = ["id", "name", "key", "enabled", "defined_by", *(field for _, field in counts)]
    rows = []
    for record in records:
        first = True
        for per_url in record["urls"] or [{}]:
            row = dict(per_url)
            if per_url:
                row["held"] = "HELD" if per_url.get("held") else ""
                if per_url.get("url_refused"):
                    row["url"] = f"{per_url['url']} (refusing: {per_url['url_refused']})"
            if first:
                row.update({k: v for k, v in record.items() if k not in ("urls", "held_for")})
                if record["key"] is None:
                    row["key"] = f"(not synced: {record['key_problem']})"
            else:
                row.update(dict.fromkeys(own, ""))
            first = False
            rows.append(row)
    print_table(
        rows,
        [
            ("ID", "id"),
            ("NAME", "name"),
            ("KEY", "key"),
            ("ENABLED", "enabled"),
            ("DEFINED BY", "defined_by"),
            *counts,
            ("URL", "url"),
            ("HELD", "held"),
            *per_url_counts,
            ("REJECTED", "rejected"),
            ("PARKED", "parked"),
            ("LAST SUCCESSFUL SYNC", "last_successful_sync"),
        ],
    )
    for record in records:
        for per_url in record["urls"]:
            if per_url["held"]:
                approved = " (approved: sent on the next run)" if per_url["hold_approved"] else ""
                click.echo(
                    f"HELD {record['id']} for {per_url['url']}: {per_url['hold_reason']}{approved}"
                )


@inspect_group.command(name="members")
@click.argument("audience")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@FORMAT_OPTION
@click.pass_obj
def inspect_members(app: App, audience: str, limit: int, output_format: str) -> None:
    """Current members of AUDIENCE (its id or key)."""
    inspection = _inspection(app)
    audience_id = inspection.find_audience(audience)
    if audience_id is None:
        raise ConfigError(f"AUDIENCE: no audience has the id or key {audience!r}")
    record = inspection.members(audience_id, limit)
    if output_format == "json":
        print_json(record)
        return
    print_table(
        record["members"],
        [("USER ID", "user_id"), ("ANONYMOUS ID", "anonymous_id"), ("EMAIL", "email"),
         ("SUPPRESSED", "suppressed")],
    )  # fmt: skip
    click.echo(f"{record['shown']} of {record['total']} member(s) of {audience_id}")


@inspect_group.command(name="user")
@click.argument("user_id")
@FORMAT_OPTION
@click.pass_obj
def inspect_user(app: App, user_id: str, output_format: str) -> None:
    """The audiences USER_ID is in, what each URL was last told, and any deletion."""
    record = _inspection(app).user(user_id, app.settings.tray.urls)
    if output_format == "json":
        print_json(record)
        return
    click.echo(f"user {user_id}")
    if record["deleted"]:
        click.echo(f"deleted (suppressed) since {record['deletion_requested_at']}")
        print_table(
            record["deletion_deliveries"],
            [("URL", "url"), ("DELETE DELIVERED", "delivered_at"), ("MESSAGE ID", "message_id"),
             ("ATTEMPTS", "attempts"), ("LAST STATUS", "last_status"),
             ("LAST ERROR", "last_error")],
        )  # fmt: skip
    names = ", ".join(f"{a['id']} ({a['key'] or 'no key'})" for a in record["audiences"])
    click.echo(f"in audiences now: {names or 'none'}")
    values = ", ".join(f"{t['key'] or t['id']}={t['value']}" for t in record["traits"])
    click.echo(f"trait values now: {values or 'none'}")
    if record["told"]:
        print_table(
            record["told"],
            [("URL", "url"), ("KEY", "key"), ("LAST TOLD", "value"), ("WHEN", "delivered_at"),
             ("MESSAGE ID", "message_id")],
        )  # fmt: skip
    if record["pending"]:
        click.echo("not yet delivered:")
        print_table(
            record["pending"],
            [("URL", "url"), ("KEY", "key"), ("VALUE", "value"), ("STATE", "status"),
             ("ATTEMPTS", "attempts"), ("LAST STATUS", "last_status"),
             ("MESSAGE ID", "message_id")],
        )  # fmt: skip


_EVENT_WORDS = {
    "detected": "change detected",
    "attempt": "sent",
    "pending": "queued",
    "deletion_requested": "deletion requested",
    "deletion_attempt": "delete sent",
    "deletion_delivered": "delete delivered",
}


@main.command(name="explain")
@click.argument("user_id")
@FORMAT_OPTION
@click.pass_obj
def explain_command(app: App, user_id: str, output_format: str) -> None:
    """Why each URL got what it got about USER_ID: every change across audiences, traits and
    URLs, when it was detected, each attempt and its outcome, what is still queued, and the
    deletion if any (from the change log, kept [history] keep_days, and the current state)."""
    record = _inspection(app).explain(user_id, app.settings.tray.urls)
    if output_format == "json":
        print_json(record)
        return
    click.echo(f"user {user_id}")
    if record["deleted"]:
        click.echo(
            f"deleted (suppressed) since {record['deletion_requested_at']}: "
            "what was sent about them before is forgotten"
        )
    names = ", ".join(f"{a['id']} ({a['key'] or 'no key'})" for a in record["audiences"])
    click.echo(f"in audiences now: {names or 'none'}")
    values = ", ".join(f"{t['key'] or t['id']}={t['value']}" for t in record["traits"])
    click.echo(f"trait values now: {values or 'none'}")
    if not record["events"]:
        click.echo("nothing was sent about this user (within the history kept)")
        return
    rows = [
        {
            **event,
            "what": _EVENT_WORDS[event["event"]],
            "result": " ".join(
                str(part)
                for part in (event.get("outcome"), event.get("http_status"))
                if part is not None
            ),
        }
        for event in record["events"]
    ]
    print_table(
        rows,
        [("WHEN", "at"), ("WHAT", "what"), ("URL", "url"), ("KEY", "key"), ("VALUE", "value"),
         ("CALL", "call"), ("RESULT", "result"), ("ATTEMPTS", "attempts"), ("RUN", "run_id"),
         ("ERROR", "error"), ("MESSAGE ID", "message_id")],
    )  # fmt: skip


@inspect_group.command(name="runs")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@FORMAT_OPTION
@click.pass_obj
def inspect_runs(app: App, limit: int, output_format: str) -> None:
    """Recent runs, newest first."""
    records = _inspection(app).runs(limit)
    if output_format == "json":
        print_json(records)
        return
    print_table(
        records,
        [("RUN", "id"), ("TRIGGER", "trigger"), ("STARTED", "started_at"),
         ("SECONDS", "duration_seconds"), ("STATUS", "status"), ("AUDIENCES", "audiences"),
         ("ENTERED", "entered"), ("EXITED", "exited"), ("DELIVERED", "delivered"),
         ("PENDING", "pending"), ("REJECTED", "rejected"), ("PARKED", "parked"),
         ("HELD", "held"), ("URLS DOWN", "urls_down"), ("SKIPPED", "skipped"),
         ("ERROR", "error")],
    )  # fmt: skip


@inspect_group.command(name="failures")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@FORMAT_OPTION
@click.pass_obj
def inspect_failures(app: App, limit: int, output_format: str) -> None:
    """Changes and deletes not yet delivered (retrying or rejected), per URL."""
    records = _inspection(app).failures(app.settings.tray.urls, limit)
    if output_format == "json":
        print_json(records)
        return
    if not records:
        click.echo("no failures: every change and delete tried so far was delivered")
        return
    print_table(
        records,
        [("URL", "url"), ("TYPE", "type"), ("KEY", "key"), ("USER ID", "user_id"),
         ("VALUE", "value"), ("STATE", "state"), ("ATTEMPTS", "attempts"),
         ("LAST STATUS", "last_status"), ("LAST ERROR", "last_error"),
         ("LAST ATTEMPT", "last_attempt_at")],
    )  # fmt: skip


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point, and the one place an error becomes a line and a status."""
    try:
        result = main.main(args=argv, prog_name="syncer", standalone_mode=False)
        code = result if isinstance(result, int) else EXIT_OK
    except SyncerError as error:
        click.echo(f"syncer: error: {_one_line(error)}", err=True)
        code = error.exit_code
    except click.UsageError as error:
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
        click.echo(f"syncer: error: {_one_line(error.format_message())}{hint}", err=True)
        code = EXIT_USAGE
    except click.ClickException as error:
        click.echo(f"syncer: error: {_one_line(error.format_message())}", err=True)
        code = error.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("syncer: interrupted", err=True)
        code = 130
    except DBAPIError as error:
        # The driver's own message, without the statement and its parameters.
        click.echo(f"syncer: error: database error: {_one_line(error.orig)}", err=True)
        code = EXIT_DATABASE
    except Exception as error:
        log.debug("internal_error", exc_info=True)
        click.echo(
            f"syncer: internal error: {type(error).__name__}: {_one_line(error)} "
            '(set [logging] level = "DEBUG" for the traceback)',
            err=True,
        )
        code = EXIT_INTERNAL
    sys.exit(code)


def console() -> None:
    """The `syncer` command (``python -m syncer`` too): :func:`run`, then a quick exit.

    What the command built stays alive until the interpreter ends, and its final garbage
    collection would walk all of it (every module SQLAlchemy, pydantic and aiohttp loaded): a
    quarter of a second at every exit on this project's 2-core machine. Frozen objects are
    skipped by that walk; atexit handlers and buffered output are unaffected.
    """
    try:
        run()
    finally:
        gc.freeze()
