"""Trait keys: deriving a key from an audience name, and resolving every audience's key."""

from __future__ import annotations

import pytest

from syncer.core.traits import AudienceIdentity, Subject, derive_key, resolve_keys


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # The required examples.
        ("Order Completed Last 30days", "order_completed_last_30days"),
        ("High-Value Customers", "high_value_customers"),
        ("Order Completed (Last 30 Days)", "order_completed_last_30_days"),
        ("VIP's ✨ List", "vips_list"),
        ("Ärzte Newsletter", "arzte_newsletter"),
        # Edge cases.
        ("VIP\u2019s List", "vips_list"),  # curly apostrophe is dropped like a straight one
        ("Customer\u02bcs Choice", "customers_choice"),  # modifier-letter apostrophe
        ("--Big Spenders!!", "big_spenders"),  # leading and trailing symbols trimmed
        ("  padded name  ", "padded_name"),
        ("(Churn Risk)", "churn_risk"),
        ("!!!", ""),  # only symbols
        ("✨✨", ""),
        ("", ""),
        ("2024", "2024"),  # digits are kept
        ("Top 10 Buyers 2024", "top_10_buyers_2024"),
        ("Active    Users", "active_users"),  # a run of spaces is one underscore
        ("Active\tUsers\t\tNow", "active_users_now"),  # tabs too
        ("Active\nUsers", "active_users"),
        ("already_snake_case", "already_snake_case"),
        ("a__b", "a_b"),  # runs of underscores collapse
        ("ALL CAPS", "all_caps"),
        ("Zürich Café Crème", "zurich_cafe_creme"),
        ("日本語", ""),  # CJK only: nothing transliterates
        ("日本語 Fans", "fans"),
    ],
)
def test_derive_key(name: str, expected: str) -> None:
    assert derive_key(name) == expected


def aud(audience_id: str, name: str, key: str | None = None) -> AudienceIdentity:
    return AudienceIdentity(Subject.audience(audience_id), name=name, explicit_key=key)


def audiences_of(mapping: dict[str, str]) -> dict[Subject, str]:
    return {Subject.audience(audience_id): key for audience_id, key in mapping.items()}


@pytest.mark.parametrize(
    ("audiences", "locked", "expected_keys", "refused"),
    [
        pytest.param(
            [aud("a1", "High-Value Customers")],
            {},
            {"a1": "high_value_customers"},
            set(),
            id="derived-key",
        ),
        pytest.param(
            [aud("a1", "High-Value Customers", key="hvc")],
            {},
            {"a1": "hvc"},
            set(),
            id="explicit-key-used",
        ),
        pytest.param(
            [aud("a1", "!!!", key="bangs")],
            {},
            {"a1": "bangs"},
            set(),
            id="explicit-key-rescues-empty-name",
        ),
        pytest.param(
            [aud("a1", "!!!"), aud("a2", "Fine")],
            {},
            {"a2": "fine"},
            {"a1"},
            id="empty-derived-key-refused",
        ),
        pytest.param(
            [aud("a1", "日本語")],
            {},
            {},
            {"a1"},
            id="cjk-name-refused",
        ),
        pytest.param(
            [aud("a1", "VIP"), aud("a2", "vip!"), aud("a3", "Other")],
            {},
            {"a3": "other"},
            {"a1", "a2"},
            id="two-new-colliding-both-refused",
        ),
        pytest.param(
            [aud("a1", "VIP"), aud("a2", "Whatever", key="vip"), aud("a3", "Other")],
            {},
            {"a3": "other"},
            {"a1", "a2"},
            id="explicit-colliding-with-derived-both-refused",
        ),
        pytest.param(
            [aud("a1", "VIP"), aud("a2", "V.I.P."), aud("a3", "VIP ")],
            {},
            {"a2": "v_i_p"},
            {"a1", "a3"},
            id="three-way-only-colliders-refused",
        ),
        pytest.param(
            [aud("a1", "Renamed Audience")],
            {"a1": "original_key"},
            {"a1": "original_key"},
            set(),
            id="locked-key-kept-after-rename",
        ),
        pytest.param(
            [aud("a1", "Original", key="edited_key")],
            {"a1": "original"},
            {"a1": "original"},
            set(),
            id="locked-key-kept-after-explicit-key-edit",
        ),
        pytest.param(
            [aud("a1", "Original", key="NOT VALID")],
            {"a1": "original"},
            {"a1": "original"},
            set(),
            id="locked-key-kept-even-if-explicit-key-now-invalid",
        ),
        pytest.param(
            [aud("a1", "VIP", key="vip_new"), aud("a2", "Somebody", key="vip")],
            {"a1": "vip"},
            {"a1": "vip"},
            {"a2"},
            id="candidate-equals-locked-key-of-present-audience",
        ),
        pytest.param(
            [aud("a2", "VIP")],
            {"gone": "vip"},
            {},
            {"a2"},
            id="candidate-equals-locked-key-of-deleted-audience",
        ),
        pytest.param(
            [aud("a1", "VIP"), aud("a2", "VIP")],
            {"a1": "vip_old"},
            {"a1": "vip_old", "a2": "vip"},
            set(),
            id="locked-audience-name-does-not-collide-with-new",
        ),
    ],
)
def test_resolve_keys(
    audiences: list[AudienceIdentity],
    locked: dict[str, str],
    expected_keys: dict[str, str],
    refused: set[str],
) -> None:
    resolution = resolve_keys(audiences, audiences_of(locked))
    assert resolution.keys == audiences_of(expected_keys)
    assert {problem.audience_id for problem in resolution.problems} == refused
    assert len(resolution.problems) == len(refused)  # one problem per refused audience
    for problem in resolution.problems:
        assert problem.reason.strip()


@pytest.mark.parametrize(
    "bad_key",
    [
        "VIP",
        "has space",
        "has-dash",
        "",
        "ümlaut",
        "vip\n",  # a trailing newline must not slip past ^...$
        "\nvip",
    ],
)
def test_invalid_explicit_key_refused_with_reason(bad_key: str) -> None:
    resolution = resolve_keys([aud("a1", "Good Name", key=bad_key), aud("a2", "Other")], {})
    assert resolution.keys == audiences_of({"a2": "other"})
    assert [problem.audience_id for problem in resolution.problems] == ["a1"]
    reason = resolution.problems[0].reason
    assert repr(bad_key) in reason
    assert "invalid" in reason


def test_empty_derived_key_reason_names_the_audience_name() -> None:
    resolution = resolve_keys([aud("a1", "✨✨")], {})
    assert resolution.keys == {}
    assert "'✨✨'" in resolution.problems[0].reason
    assert "empty" in resolution.problems[0].reason


def test_collision_reason_names_the_other_audience() -> None:
    resolution = resolve_keys([aud("a1", "VIP"), aud("a2", "vip")], {})
    reasons = {problem.audience_id: problem.reason for problem in resolution.problems}
    assert "a2" in reasons["a1"]
    assert "a1" in reasons["a2"]
    assert "'vip'" in reasons["a1"]


def test_locked_key_reason_names_the_owner() -> None:
    resolution = resolve_keys([aud("a2", "VIP")], audiences_of({"gone": "vip"}))
    assert "'gone'" in resolution.problems[0].reason
    assert "'vip'" in resolution.problems[0].reason


def test_audiences_and_traits_share_one_key_namespace() -> None:
    trait = AudienceIdentity(Subject.trait("t1"), "VIP", None)
    resolution = resolve_keys([aud("a1", "VIP"), trait, aud("a2", "Loyal")], {})
    assert resolution.keys == audiences_of({"a2": "loyal"})
    reasons = {problem.subject: problem.reason for problem in resolution.problems}
    assert "trait 't1'" in reasons[Subject.audience("a1")]
    assert "audience 'a1'" in reasons[Subject.trait("t1")]


def test_an_audience_and_a_trait_may_share_an_id() -> None:
    same_id = [
        aud("x", "Big Spenders"),
        AudienceIdentity(Subject.trait("x"), "Lifetime Value", None),
    ]
    resolution = resolve_keys(same_id, {Subject.trait("x"): "ltv"})
    assert resolution.keys == {Subject.audience("x"): "big_spenders", Subject.trait("x"): "ltv"}
    assert resolution.problems == []


def test_a_trait_cannot_take_a_key_locked_by_an_audience() -> None:
    trait = AudienceIdentity(Subject.trait("t1"), "VIP", None)
    resolution = resolve_keys([trait], audiences_of({"gone": "vip"}))
    assert resolution.keys == {}
    assert resolution.problems[0].reason == "key 'vip' already belongs to audience 'gone'"
