"""Which audiences and computed traits a workflow URL receives: shell-style patterns on keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from syncer.core.states import Kind


@dataclass(frozen=True)
class Route:
    """The keys one URL receives. ``None`` for a kind means every key of it; a URL that names
    patterns for one kind only receives none of the other."""

    audiences: tuple[str, ...] | None = None
    traits: tuple[str, ...] | None = None

    @classmethod
    def of(cls, audiences: Sequence[str] | None, traits: Sequence[str] | None) -> Route:
        """The route of a ``workflow_urls`` entry: neither list given means everything."""
        if audiences is None and traits is None:
            return cls()
        return cls(tuple(audiences or ()), tuple(traits or ()))

    def takes_audience(self, key: str) -> bool:
        """Whether the URL receives the audience whose trait key is ``key``."""
        return _matches(self.audiences, key)

    def takes_trait(self, key: str) -> bool:
        """Whether the URL receives the computed trait whose key is ``key``."""
        return _matches(self.traits, key)

    def takes(self, kind: Kind, key: str) -> bool:
        """Whether the URL receives the audience or trait (``kind``) whose key is ``key``."""
        return self.takes_audience(key) if kind is Kind.AUDIENCE else self.takes_trait(key)


def _matches(patterns: tuple[str, ...] | None, key: str) -> bool:
    # Case-sensitive on every platform: keys are snake_case, and a pattern means the same
    # on Windows as on Linux.
    return patterns is None or any(fnmatchcase(key, pattern) for pattern in patterns)
