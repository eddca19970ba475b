"""flows/nlu.py: intent ranking, rejection below the threshold, entities (pattern, values,
synonyms, typos, overlaps, positions), an empty domain. Accuracy and speed are measured
by bench/nlu.py, not here."""

from __future__ import annotations

from typing import Any

import pytest

from flows.dsl import Domain
from flows.nlu import (
    DEFAULT_THRESHOLD,
    Understander,
    build_understander,
    edit_distance,
    fold,
)
from flows.ports import EntityMatch, Understanding

INTENTS: dict[str, Any] = {
    "greet": {"examples": ["hi", "hello", "good morning", "hey there"]},
    "order_status": {"examples": [
        "where is my order", "track my order", "when will my package arrive",
        "has my order shipped", "what's the status of order 123456"]},
    "opening_hours": {"examples": [
        "opening hours", "when are you open", "what time do you close",
        "are you open on sunday"]},
    "human": {"examples": [
        "talk to a human", "I want to speak to an agent", "real person please",
        "connect me to customer service"]},
    "cancel_order": {"examples": [
        "cancel my order", "I want to cancel the order", "please cancel order 123456"]},
}
ENTITIES: dict[str, Any] = {
    "order_number": {"pattern": r"\b\d{6,10}\b"},
    "email": {"pattern": r"[\w.+-]+@[\w-]+\.[\w.-]+"},
    "payment_method": {
        "values": ["card", "paypal", "bank_transfer", "apple_pay"],
        "synonyms": {"card": ["credit card", "visa", "mastercard"],
                     "bank_transfer": ["wire transfer"]},
    },
    "country": {
        "values": ["germany", "netherlands", "switzerland", "austria"],
        "synonyms": {"germany": ["deutschland"], "netherlands": ["holland"],
                     "switzerland": ["schweiz"]},
    },
    "shop": {"values": ["example"]},
}


def domain(**extra: Any) -> Domain:
    return Domain.model_validate({"intents": INTENTS, "entities": ENTITIES, **extra})


@pytest.fixture(scope="module")
def nlu() -> Understander:
    return build_understander(domain())


def pairs(result: Understanding) -> list[tuple[str, str]]:
    return [(e.entity, e.value) for e in result.entities]


# ------------------------------------------------------------------------ intents


@pytest.mark.parametrize(("text", "intent"), [
    ("hello!", "greet"),
    ("Where is my order?", "order_status"),
    ("when are you open on saturday", "opening_hours"),
    ("I'd like to talk to a human please", "human"),
    ("please cancel my order", "cancel_order"),
    ("track my order 98765432", "order_status"),  # a number is a number, not a feature
])
def test_clear_phrases_rank_their_intent_first(nlu: Understander, text: str, intent: str):
    result = nlu.parse(text)
    assert result.text == text
    assert result.intent == intent
    assert result.ranking[0] == (intent, result.confidence)
    assert result.confidence >= DEFAULT_THRESHOLD
    # every intent is ranked, best first, scores in 0..1
    assert sorted(name for name, _ in result.ranking) == sorted(INTENTS)
    scores = [score for _, score in result.ranking]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[0] > scores[1]


def test_every_example_is_understood_as_its_intent(nlu: Understander):
    for name, spec in INTENTS.items():
        for example in spec["examples"]:
            result = nlu.parse(example)
            assert result.intent == name, example
            assert result.confidence > DEFAULT_THRESHOLD, example


def test_case_accents_and_punctuation_do_not_matter(nlu: Understander):
    plain = nlu.parse("when are you open")
    assert nlu.parse("WHEN ARE YOU OPEN???").confidence == pytest.approx(plain.confidence)
    assert nlu.parse("whén are yoü open").confidence == pytest.approx(plain.confidence)


def test_typos_still_find_the_intent(nlu: Understander):
    assert nlu.parse("wheres my oder").intent == "order_status"
    assert nlu.parse("opning hours?").intent == "opening_hours"
    assert nlu.parse("cancle my order").intent == "cancel_order"


@pytest.mark.parametrize("text", [
    "asdfghjkl", "qwerty zxcvb", "what is the capital of peru", "sing me a song",
    "", "   ", "!!!", "42",
])
def test_gibberish_and_out_of_scope_give_no_intent(nlu: Understander, text: str):
    result = nlu.parse(text)
    assert result.intent is None
    assert result.confidence < DEFAULT_THRESHOLD
    assert [name for name, _ in result.ranking] != []  # still ranked, for "did you mean"


def test_the_threshold_decides_between_an_intent_and_none():
    text = "when do you open"
    score = build_understander(domain()).parse(text).confidence
    assert 0 < score < 1
    assert build_understander(domain(), threshold=score - 0.01).parse(text).intent == (
        "opening_hours")
    assert build_understander(domain(), threshold=score + 0.01).parse(text).intent is None


def test_an_empty_domain_understands_nothing_and_finds_no_entities():
    nlu = build_understander(Domain())
    result = nlu.parse("where is my order 123456")
    assert result == Understanding("where is my order 123456", None, 0.0, [], [])


def test_entities_without_intents_and_intents_without_entities():
    only_entities = build_understander(Domain.model_validate({"entities": ENTITIES}))
    result = only_entities.parse("order 1234567")
    assert result.intent is None
    assert pairs(result) == [("order_number", "1234567")]
    only_intents = build_understander(Domain.model_validate({"intents": INTENTS}))
    result = only_intents.parse("track my order 1234567 paid by visa")
    assert result.intent == "order_status"
    assert result.entities == []


def test_one_intent_with_one_example():
    nlu = build_understander(Domain.model_validate(
        {"intents": {"greet": {"examples": ["hello"]}}}))
    assert nlu.parse("hello").intent == "greet"
    assert nlu.parse("hello").confidence == pytest.approx(1.0)
    assert nlu.parse("refund my order").intent is None


# ----------------------------------------------------------------------- entities


def test_pattern_entity_value_and_position(nlu: Understander):
    text = "Where is order 48213377? Mail me at jo.doe@example.org"
    result = nlu.parse(text)
    order = EntityMatch("order_number", "48213377", 15, 23, "48213377")
    email = EntityMatch("email", "jo.doe@example.org", 36, 54, "jo.doe@example.org")
    # "example" (a listed shop value) lies inside the email address: dropped
    assert result.entities == [order, email]
    for match in result.entities:
        assert text[match.start : match.end] == match.text


def test_pattern_entities_find_every_match(nlu: Understander):
    result = nlu.parse("merge 1234567 and 7654321, not 12345")
    assert [(e.value, e.start) for e in result.entities] == [("1234567", 6), ("7654321", 18)]


def test_values_any_case_normalised_to_the_listed_value(nlu: Understander):
    result = nlu.parse("I paid with PayPal")
    assert result.entities == [EntityMatch("payment_method", "paypal", 12, 18, "PayPal")]


def test_synonyms_normalised_to_their_value(nlu: Understander):
    text = "my Credit Card failed, shipping to Deutschland"
    result = nlu.parse(text)
    assert result.entities == [
        EntityMatch("payment_method", "card", 3, 14, "Credit Card"),
        EntityMatch("country", "germany", 35, 46, "Deutschland"),
    ]


def test_a_value_with_an_underscore_matches_as_words(nlu: Understander):
    assert pairs(nlu.parse("apple pay does not work")) == [("payment_method", "apple_pay")]
    assert pairs(nlu.parse("apple-pay failed")) == [("payment_method", "apple_pay")]
    assert pairs(nlu.parse("I used bank_transfer")) == [("payment_method", "bank_transfer")]


def test_values_match_whole_words_only(nlu: Understander):
    # "card" inside "cardigan", "visa" inside "visage", "holland" inside "hollandaise"
    assert nlu.parse("a cardigan, a visage, some hollandaise").entities == []


def test_several_values_of_one_entity(nlu: Understander):
    assert pairs(nlu.parse("do you ship to holland and austria?")) == [
        ("country", "netherlands"), ("country", "austria")]


def test_typos_in_values_are_tolerated(nlu: Understander):
    result = nlu.parse("paypall doesn't work, I'm in Austira")
    assert result.entities == [
        EntityMatch("payment_method", "paypal", 0, 7, "paypall"),
        EntityMatch("country", "austria", 29, 36, "Austira"),
    ]
    assert pairs(nlu.parse("my mastercrad was declined")) == [("payment_method", "card")]
    assert pairs(nlu.parse("wire tranfser please")) == [("payment_method", "bank_transfer")]


def test_typos_are_not_guessed_in_short_words_or_first_letters(nlu: Understander):
    assert nlu.parse("my cart is empty").entities == []  # card: 4 letters, exact only
    assert nlu.parse("qaypal").entities == []  # the first letter must be right
    assert nlu.parse("paypaaal").entities == []  # two edits in a 6-letter value


def test_the_longest_match_of_an_entity_wins(nlu: Understander):
    # "card" alone is a value, "credit card" a synonym: one match, the longer
    assert nlu.parse("credit card").entities == [
        EntityMatch("payment_method", "card", 0, 11, "credit card")]


def test_overlapping_entities():
    entities = {
        "order_number": {"pattern": r"\d{6}"},
        "customer_number": {"pattern": r"\d{6}"},
        "code": {"pattern": r"[A-Z]{2}-\d{6}"},
        "city": {"values": ["new york", "york"]},
        "state": {"values": ["new york"]},
    }
    nlu = build_understander(Domain.model_validate({"entities": entities}))
    # the same span for two entities: both kept (each fills its own slot)
    assert pairs(nlu.parse("123456")) == [
        ("order_number", "123456"), ("customer_number", "123456")]
    # a match inside a longer match of another entity: dropped
    result = nlu.parse("code AB-123456")
    assert [(e.entity, e.text) for e in result.entities] == [("code", "AB-123456")]
    # within one entity the longest wins ("new york", not "york"); another entity on
    # the same span stays
    result = nlu.parse("I live in New York")
    assert [(e.entity, e.value, e.start, e.end) for e in result.entities] == [
        ("city", "new york", 10, 18), ("state", "new york", 10, 18)]
    assert pairs(nlu.parse("york")) == [("city", "york")]


def test_synonyms_without_values_use_their_keys_as_values():
    nlu = build_understander(Domain.model_validate(
        {"entities": {"size": {"synonyms": {"small": ["s", "tiny"], "large": ["xl"]}}}}))
    assert pairs(nlu.parse("a tiny one, or XL, or large")) == [
        ("size", "small"), ("size", "large"), ("size", "large")]


def test_a_case_insensitive_pattern_by_its_own_flag():
    spec = {"entities": {"ticket": {"pattern": r"(?i)\btk-\d+"}}}
    nlu = build_understander(Domain.model_validate(spec))
    assert pairs(nlu.parse("ticket TK-42 and tk-7")) == [("ticket", "TK-42"), ("ticket", "tk-7")]


def test_entities_come_with_the_intent(nlu: Understander):
    result = nlu.parse("please cancel order 5566778, I paid with visa")
    assert result.intent == "cancel_order"
    assert pairs(result) == [("order_number", "5566778"), ("payment_method", "card")]


# -------------------------------------------------------------------------- helpers


def test_edit_distance():
    assert edit_distance("paypal", "paypal", 1) == 0
    assert edit_distance("paypall", "paypal", 1) == 1
    assert edit_distance("austira", "austria", 1) == 1  # a transposition is one edit
    assert edit_distance("kitten", "sitting", 3) == 3
    assert edit_distance("kitten", "sitting", 1) == 2  # stops past the limit
    assert edit_distance("", "abc", 5) == 3


def test_fold():
    assert fold("Crème") == "creme"
    assert fold("STRASSE") == fold("straße")
