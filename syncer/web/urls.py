"""The configured workflow URLs, matched to their rows in ``syncer_destinations``."""

from __future__ import annotations

from collections.abc import Sequence

from syncer.core.urls import canonical_url
from syncer.store.status import DestinationRow


class ConfiguredUrls:
    """The URLs of ``[tray] workflow_urls``, as configured, in order, and their rows.

    Rows are matched by canonical form (as the engine keys them), so a URL keeps its history
    through a cosmetic edit of the setting; URLs no longer configured are left out.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self.canonical = {url: canonical_url(url) for url in self.urls}

    def rows(self, known: Sequence[DestinationRow]) -> dict[str, DestinationRow | None]:
        """Each configured URL -> its row (None until a run has seen it)."""
        by_canonical = {row.canonical: row for row in known}
        return {url: by_canonical.get(self.canonical[url]) for url in self.urls}

    def names(self, known: Sequence[DestinationRow]) -> dict[int, str]:
        """Destination id -> configured URL, for the configured URLs a run has seen."""
        return {row.id: url for url, row in self.rows(known).items() if row is not None}
