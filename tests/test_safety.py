"""Prompt safety filter: real alt-profanity-check model plus regex rules."""

from __future__ import annotations

import pytest

from imagegenx.types import UserError
from imagegenx.vision.safety import DEFAULT_RULES, PromptBlocked, PromptFilter, normalize_prompt


@pytest.fixture(scope="module")
def prompt_filter() -> PromptFilter:
    f = PromptFilter()
    f.warmup()
    return f


def test_benign_prompts_pass(prompt_filter):
    for prompt in (
        "a red fox in snow, photo",
        "portrait of a child at the beach, golden hour",
        "a marble statue in a museum, (dramatic lighting:1.2)",
        "",
    ):
        verdict = prompt_filter.check(prompt)
        assert verdict.allowed, (prompt, verdict)
        assert verdict.reason is None and 0.0 <= verdict.score < 0.8
    assert prompt_filter.enforce("a red fox in snow, photo").allowed


def test_profanity_is_refused_with_a_reason(prompt_filter):
    verdict = prompt_filter.check("you stupid fucking idiot")
    assert not verdict.allowed
    assert verdict.category == "profanity" and verdict.score >= 0.8
    assert "profanity" in verdict.reason
    with pytest.raises(PromptBlocked, match="profanity") as info:
        prompt_filter.enforce("you stupid fucking idiot")
    assert isinstance(info.value, UserError)  # the API maps UserError to HTTP 400
    assert info.value.category == "profanity"


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("hentai girl, detailed", "explicit_sexual"),
        ("two people having sex", "explicit_sexual"),
        ("(nude:1.3) 12 year old girl", "sexual_minors"),
        ("a naked child", "sexual_minors"),
        ("Decapitated soldier on a battlefield", "gore"),
        ("zombie with entrails hanging out", "gore"),
    ],
)
def test_rule_matches_name_the_category(prompt_filter, prompt, category):
    verdict = prompt_filter.check(prompt)
    assert not verdict.allowed
    assert verdict.category == category and verdict.score == 1.0
    assert f"'{category}'" in verdict.reason
    with pytest.raises(PromptBlocked, match=category):
        prompt_filter.enforce(prompt)


def test_custom_rules():
    f = PromptFilter(rules=["brand: \\bacme\\b", "\\bclown\\b"], profanity=False)
    blocked = f.check("An ACME rocket")
    assert not blocked.allowed and blocked.category == "brand"
    assert f.check("a sad clown").category == "custom"
    # Custom rules replace the defaults...
    assert f.check("hentai girl").allowed
    # ...unless extended.
    extended = PromptFilter(rules=[*DEFAULT_RULES, "brand: \\bacme\\b"], profanity=False)
    assert extended.check("hentai girl").category == "explicit_sexual"
    assert extended.check("acme anvil").category == "brand"
    # No rules at all, profanity only.
    assert PromptFilter(rules=[], profanity=False).check("gore everywhere").allowed
    with pytest.raises(UserError, match="invalid safety rule"):
        PromptFilter(rules=["bad: ([unclosed"], profanity=False)
    with pytest.raises(UserError, match="threshold"):
        PromptFilter(threshold=0.0, profanity=False)


def test_threshold_is_configurable(prompt_filter):
    score = prompt_filter.check("a red fox in snow, photo").score
    strict = PromptFilter(rules=[], threshold=max(score / 2, 1e-6))
    assert not strict.check("a red fox in snow, photo").allowed


def test_normalize_prompt():
    assert normalize_prompt("  (Red:1.2)  [FOX]\n{snow} ") == "red fox snow"


def test_the_one_step_profanity_score_is_the_libraries_own():
    """The scorer the filter uses computes exactly alt-profanity-check's predict_prob, on plain prompts,
    insults and word soups drawn from the model's whole vocabulary."""
    import random

    import numpy as np
    from profanity_check import predict_prob
    from profanity_check import profanity_check as fitted

    from imagegenx.vision.safety import linear_profanity_scorer

    score = linear_profanity_scorer(fitted.vectorizer, fitted.model)
    assert score is not None
    words = sorted(fitted.vectorizer.vocabulary_)
    rng = random.Random(0)
    texts = ["a lighthouse on a cliff at dusk", "you stupid idiot", "", "kill them all you bastards"]
    texts += [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(300)]
    want, got = predict_prob(texts), score(texts)
    assert np.abs(want - got).max() < 1e-12
    assert (want > 0.8).sum() >= 3 and (want < 0.2).sum() > 100  # both sides of the threshold
    assert linear_profanity_scorer(fitted.vectorizer, object()) is None  # another shape: the library's own


def test_the_filter_scores_with_the_one_step_scorer(prompt_filter):
    from profanity_check import predict_prob

    prompt_filter.warmup()
    assert prompt_filter._predict_prob is not predict_prob
    assert prompt_filter.profanity_score("you stupid idiot") == pytest.approx(
        predict_prob(["you stupid idiot"])[0]
    )
