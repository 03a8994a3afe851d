"""Routing per workflow URL: which audience and trait keys an entry receives."""

from __future__ import annotations

import pytest

from syncer.core.routing import Route

ROUTES = [
    # (audiences, traits, key, takes it as an audience, takes it as a trait)
    pytest.param(None, None, "loyal_customers", True, True, id="neither-list-everything"),
    pytest.param(["loyal_*"], None, "loyal_customers", True, False, id="audiences-only-match"),
    pytest.param(["loyal_*"], None, "churn_risk", False, False, id="audiences-only-other"),
    pytest.param(None, ["ltv_*"], "ltv_90d", False, True, id="traits-only-match"),
    pytest.param(None, ["ltv_*"], "loyal_customers", False, False, id="traits-only-other"),
    pytest.param([], None, "loyal_customers", False, False, id="empty-audiences-nothing"),
    pytest.param([], [], "ltv_90d", False, False, id="both-empty-nothing"),
    pytest.param(["*"], ["*"], "anything", True, True, id="star-matches-all"),
    pytest.param(["loyal_?"], None, "loyal_1", True, False, id="question-mark-one-char"),
    pytest.param(["loyal_?"], None, "loyal_12", False, False, id="question-mark-not-two"),
    pytest.param(["tier_[ab]"], None, "tier_b", True, False, id="character-class"),
    pytest.param(["Loyal_*"], None, "loyal_customers", False, False, id="case-sensitive"),
    pytest.param(["a", "loyal_*"], None, "loyal_x", True, False, id="any-pattern-of-several"),
    pytest.param(["loyal"], None, "loyal_customers", False, False, id="whole-key-not-prefix"),
]


@pytest.mark.parametrize(("audiences", "traits", "key", "as_audience", "as_trait"), ROUTES)
def test_route(
    audiences: list[str] | None,
    traits: list[str] | None,
    key: str,
    as_audience: bool,
    as_trait: bool,
) -> None:
    route = Route.of(audiences, traits)
    assert route.takes_audience(key) is as_audience
    assert route.takes_trait(key) is as_trait
