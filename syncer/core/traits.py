"""Trait keys: how an audience's name becomes the snake_case trait Tray receives."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import inflection

from syncer.core.states import Kind

KEY_PATTERN = re.compile(r"[a-z0-9_]+")
_APOSTROPHES = re.compile(r"['\u2019\u02bc\u2018`]")
_NON_ALNUM_RUN = re.compile(r"[^a-z0-9]+")
# Letters that Unicode decomposition cannot reduce to ASCII, spelled as people spell them.
_LIGATURES = str.maketrans(
    {"ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O",
     "đ": "d", "Đ": "D", "ł": "l", "Ł": "L", "þ": "th", "Þ": "TH", "ð": "d", "Ð": "D"}
)  # fmt: skip


def derive_key(name: str) -> str:
    """Turn an audience name into a snake_case trait key.

    Transliterates to ASCII, drops apostrophes (so "VIP's" reads "vips"), lower-cases, and turns
    every run of other non-alphanumeric characters into one underscore, trimmed at both ends.
    The result may be empty (a name of only symbols); callers treat that as a problem.
    """
    spelled = _APOSTROPHES.sub("", name).translate(_LIGATURES)
    ascii_name = inflection.transliterate(spelled).lower()
    return _NON_ALNUM_RUN.sub("_", ascii_name).strip("_")


@dataclass(frozen=True, order=True)
class Subject:
    """What one trait key names: an audience or a computed trait, by its upstream id."""

    kind: Kind
    id: str

    def __str__(self) -> str:
        return f"{self.kind.value} {self.id!r}"

    @classmethod
    def audience(cls, audience_id: str) -> Subject:
        """The audience with this id."""
        return cls(Kind.AUDIENCE, audience_id)

    @classmethod
    def trait(cls, trait_id: str) -> Subject:
        """The computed trait with this id."""
        return cls(Kind.TRAIT, trait_id)


@dataclass(frozen=True)
class AudienceIdentity:
    """What key resolution needs to know of one audience or computed trait."""

    subject: Subject
    name: str
    explicit_key: str | None


@dataclass(frozen=True)
class KeyProblem:
    """Why an audience or computed trait cannot be synced (under any key, or at all)."""

    subject: Subject
    reason: str

    @property
    def audience_id(self) -> str:
        """The upstream id of what cannot be synced."""
        return self.subject.id


@dataclass(frozen=True)
class KeyResolution:
    """The key of every audience and trait that can be synced, and the problems of those that
    cannot."""

    keys: dict[Subject, str]
    problems: list[KeyProblem]


def resolve_keys(
    identities: Iterable[AudienceIdentity], locked: Mapping[Subject, str]
) -> KeyResolution:
    """Decide the trait key of every audience and computed trait: one namespace for both, as
    both become trait names.

    ``locked`` maps each subject to the key it was first synced under: such a key never changes,
    even when the audience is renamed or its explicit key edited, and is never given to another,
    even after the one that held it is gone. An unlocked subject takes its explicit key when
    set, else the key derived from its name. Subjects whose candidate key is empty, invalid,
    taken by a locked key, or shared with another candidate are all refused: picking a winner
    silently would send one audience's members under another's name.
    """
    keys: dict[Subject, str] = {}
    problems: list[KeyProblem] = []
    candidates: dict[Subject, str] = {}
    taken = {key: subject for subject, key in locked.items()}
    for identity in identities:
        subject = identity.subject
        if subject in locked:
            keys[subject] = locked[subject]
            continue
        if identity.explicit_key is not None:
            if not KEY_PATTERN.fullmatch(identity.explicit_key):
                problems.append(
                    KeyProblem(
                        subject,
                        f"key {identity.explicit_key!r} is invalid: it must match ^[a-z0-9_]+$",
                    )
                )
                continue
            candidates[subject] = identity.explicit_key
            continue
        derived = derive_key(identity.name)
        if not derived:
            problems.append(
                KeyProblem(
                    subject, f"name {identity.name!r} gives an empty key: set the key column"
                )
            )
            continue
        candidates[subject] = derived
    counts = Counter(candidates.values())
    for subject, key in candidates.items():
        if key in taken:
            problems.append(KeyProblem(subject, f"key {key!r} already belongs to {taken[key]}"))
        elif counts[key] > 1:
            others = sorted(s for s, k in candidates.items() if k == key and s != subject)
            problems.append(
                KeyProblem(
                    subject,
                    f"key {key!r} collides with {', '.join(str(other) for other in others)}",
                )
            )
        else:
            keys[subject] = key
    return KeyResolution(keys=keys, problems=problems)
