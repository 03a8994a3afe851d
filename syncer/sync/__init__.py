"""Runs: plan each (URL, audience) in SQL, then send what is claimed, fenced by the claim."""

from syncer.sync.context import Progress, holder_is_dead
from syncer.sync.engine import (
    DryRunEmitter,
    SyncEngine,
    SyncOptions,
    query_defined,
    select_audiences,
)
from syncer.sync.reports import DeletionReport, PairReport, SyncReport

__all__ = [
    "DeletionReport",
    "DryRunEmitter",
    "PairReport",
    "Progress",
    "SyncEngine",
    "SyncOptions",
    "SyncReport",
    "holder_is_dead",
    "query_defined",
    "select_audiences",
]
