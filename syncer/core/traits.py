"""Trait keys: how an audience's name becomes the snake_case trait Tray receives."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import inflection

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


@dataclass(frozen=True)
class AudienceIdentity:
    """What key resolution needs to know of one audience."""

    audience_id: str
    name: str
    explicit_key: str | None


@dataclass(frozen=True)
class KeyProblem:
    """Why an audience cannot be synced under any key."""

    audience_id: str
    reason: str


@dataclass(frozen=True)
class KeyResolution:
    """The key of every audience that can be synced, and the problems of those that cannot."""

    keys: dict[str, str]
    problems: list[KeyProblem]


def resolve_keys(audiences: Iterable[AudienceIdentity], locked: Mapping[str, str]) -> KeyResolution:
    """Decide the trait key of every audience.

    ``locked`` maps audience id to the key it was first synced under: such a key never changes,
    even when the audience is renamed or its explicit key edited, and is never given to another
    audience, even after the audience that held it is gone. An unlocked audience takes its explicit
    key when set, else the key derived from its name. Audiences whose candidate key is empty,
    invalid, taken by a locked key, or shared with another candidate are all refused: picking a
    winner silently would send one audience's members under another's name.
    """
    keys: dict[str, str] = {}
    problems: list[KeyProblem] = []
    candidates: dict[str, str] = {}
    taken = {key: audience_id for audience_id, key in locked.items()}
    for audience in audiences:
        if audience.audience_id in locked:
            keys[audience.audience_id] = locked[audience.audience_id]
            continue
        if audience.explicit_key is not None:
            if not KEY_PATTERN.fullmatch(audience.explicit_key):
                problems.append(
                    KeyProblem(
                        audience.audience_id,
                        f"key {audience.explicit_key!r} is invalid: it must match ^[a-z0-9_]+$",
                    )
                )
                continue
            candidates[audience.audience_id] = audience.explicit_key
            continue
        derived = derive_key(audience.name)
        if not derived:
            problems.append(
                KeyProblem(
                    audience.audience_id,
                    f"name {audience.name!r} gives an empty key: set audiences.key",
                )
            )
            continue
        candidates[audience.audience_id] = derived
    counts = Counter(candidates.values())
    for audience_id, key in candidates.items():
        if key in taken:
            problems.append(
                KeyProblem(audience_id, f"key {key!r} already belongs to audience {taken[key]!r}")
            )
        elif counts[key] > 1:
            others = sorted(a for a, k in candidates.items() if k == key and a != audience_id)
            problems.append(
                KeyProblem(
                    audience_id, f"key {key!r} collides with audience(s) {', '.join(others)}"
                )
            )
        else:
            keys[audience_id] = key
    return KeyResolution(keys=keys, problems=problems)
