"""The mapping rules (SPEC §3–5) as plain functions: precedence, values, limits."""

from __future__ import annotations

import enum
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_metadata import mapping
from otel_metadata.mapping import (
    MAX_KEY_LENGTH,
    MappingRules,
    map_attributes,
    map_weakest,
    request_id_of,
    stringify,
)
from otel_metadata.stats import Stats

RULES = MappingRules()


def mapped(attrs, rules=RULES):
    return map_attributes(attrs, rules, Stats())


def test_standard_attributes_map_to_promptlayer_keys() -> None:
    assert mapped({"user.id": "u", "gen_ai.conversation.id": "c", "http.method": "GET"}) == {
        "user_id": "u", "conversation_id": "c"}


def test_fallbacks_apply_only_without_the_standard_attribute() -> None:
    assert mapped({"enduser.id": "e", "session.id": "s"}) == {
        "user_id": "e", "conversation_id": "s"}
    assert mapped({"enduser.id": "e", "user.id": "u", "session.id": "s",
                   "gen_ai.conversation.id": "c"}) == {"user_id": "u", "conversation_id": "c"}


def test_explicit_metadata_beats_standard_attribute() -> None:
    assert mapped({"user.id": "u", "promptlayer.metadata.user_id": "explicit"}) == {
        "user_id": "explicit"}


def test_nothing_else_leaves_the_process() -> None:
    attrs = {"gen_ai.prompt": "secret", "http.request.header.authorization": "Bearer x",
             "promptlayer.request_id": 5}
    assert mapped(attrs) == {}


def test_extra_attributes_are_mapped_explicitly_below_standard_ones() -> None:
    rules = MappingRules(extra_attributes={"deployment.environment.name": "environment",
                                           "tenant": "user_id"})
    assert mapped({"deployment.environment.name": "prod"}, rules) == {"environment": "prod"}
    assert mapped({"tenant": "t", "user.id": "u"}, rules) == {"user_id": "u"}
    assert mapped({"tenant": "t", "enduser.id": "e"}, rules) == {"user_id": "t"}


@pytest.mark.parametrize(("value", "text"), [
    ("as is \n\"\u2603", "as is \n\"\u2603"),
    (True, "true"), (False, "false"),
    (3, "3"), (-0, "0"), (2.5, "2.5"), (1e20, "1e+20"),
    (("a", "b"), '["a", "b"]'), ([1, 2], "[1, 2]"), ([True, False], "[true, false]"),
    ([1.5], "[1.5]"), ([], "[]"),
])
def test_values_follow_opentelemetry_non_otlp_rule(value, text) -> None:
    assert stringify(value) == text


class _Tier(str, enum.Enum):
    """An app's own string type: `str()` of it says "_Tier.GOLD", its text is "gold"."""

    GOLD = "gold"


def test_an_apps_own_string_type_gives_its_text_as_a_plain_str() -> None:
    """As JSON would encode it: the text, not the subclass's `__str__`; and a plain `str`, which
    the compact store of remembered roots needs."""
    text = stringify(_Tier.GOLD)
    assert text == "gold" and type(text) is str


def test_long_values_truncate_and_long_keys_drop_counted_once_per_key(caplog) -> None:
    stats = Stats()
    rules = MappingRules(max_value_length=10)
    long_key = "k" * (MAX_KEY_LENGTH + 1)
    for _ in range(3):
        out = map_attributes({"promptlayer.metadata.note": "x" * 50,
                              "promptlayer.metadata." + long_key: "v"}, rules, stats)
        assert out == {"note": "x" * 10}
    counts = stats.snapshot()
    assert counts["truncated_values"] == 3 and counts["dropped_keys"] == 3
    assert caplog.text.count("truncating metadata 'note'") == 1
    assert caplog.text.count("longer than 1024") == 1


def test_key_of_exactly_max_length_is_kept() -> None:
    key = "k" * MAX_KEY_LENGTH
    assert mapped({"promptlayer.metadata." + key: "v"}) == {key: "v"}


@pytest.mark.parametrize(("attrs", "expected", "ignored"), [
    ({"promptlayer.request_id": 7}, 7, 0),
    ({"promptlayer.request_id": "r-7"}, "r-7", 0),
    ({"promptlayer.request_id": ""}, None, 1),
    ({"promptlayer.request_id": 7.0}, None, 1),
    ({"promptlayer.request_id": True}, None, 1),
    ({"promptlayer.request_id": (1, 2)}, None, 1),
    ({}, None, 0),
])
def test_request_id_types(attrs, expected, ignored) -> None:
    stats = Stats()
    assert request_id_of(attrs, RULES.request_id_attributes, stats) == expected
    assert stats.snapshot().get("ignored_request_ids", 0) == ignored


def test_configured_request_id_attributes_are_tried_in_order() -> None:
    names = ("llm.request_id", "promptlayer.request_id")
    assert request_id_of({"promptlayer.request_id": 2, "llm.request_id": 1}, names, Stats()) == 1
    assert request_id_of({"promptlayer.request_id": 2, "llm.request_id": ""}, names, Stats()) == 2


attribute_values = st.one_of(
    st.text(), st.booleans(), st.integers(), st.floats(),
    st.lists(st.text(), max_size=4), st.lists(st.integers(), max_size=4),
    st.lists(st.floats(allow_nan=False), max_size=4), st.lists(st.booleans(), max_size=4),
)
attribute_keys = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["user.id", "enduser.id", "session.id", "gen_ai.conversation.id"]),
    st.text(max_size=1100).map(lambda k: "promptlayer.metadata." + k),
)


@given(st.dictionaries(attribute_keys, attribute_values, max_size=12),
       st.integers(min_value=1, max_value=2000))
def test_any_attributes_give_bounded_str_to_str_of_mapped_keys_only(attrs, limit) -> None:
    rules = MappingRules(max_value_length=limit)
    out = map_attributes(attrs, rules, Stats())
    allowed = {"user_id", "conversation_id"} | {
        k[len("promptlayer.metadata."):] for k in attrs if k.startswith("promptlayer.metadata.")}
    if "metadata" in attrs:  # OpenInference's JSON attribute: not an object, kept as it is
        allowed.add("metadata")
    for key, value in out.items():
        assert isinstance(key, str) and isinstance(value, str)
        assert 0 < len(key) <= MAX_KEY_LENGTH and len(value) <= limit
        assert key in allowed
    assert rules.is_relevant(attrs) or out == {}


@given(st.lists(st.one_of(st.integers(), st.text(), st.booleans()), max_size=5))
def test_arrays_become_json_arrays(values) -> None:
    assert json.loads(stringify(values) or "null") == values


@given(st.lists(st.dictionaries(st.one_of(attribute_keys, st.just("app.tenant")), st.just(1),
                                 max_size=6), max_size=8))
def test_names_learnt_as_irrelevant_never_change_the_answer(spans) -> None:
    learning = MappingRules(extra_attributes={"app.tenant": "tenant"})
    for attrs in spans + spans:  # each seen twice: the second time after learning
        fresh = MappingRules(extra_attributes={"app.tenant": "tenant"})
        assert learning.is_relevant(attrs) == fresh.is_relevant(attrs)


def test_a_learnt_name_beside_a_relevant_one_is_still_relevant() -> None:
    rules = MappingRules()
    assert not rules.is_relevant({"http.route": "/chat", "url.path": "/chat"})
    assert rules.is_relevant({"http.route": "/chat", "user.id": "u"})
    assert rules.is_relevant({"url.path": "/chat", "promptlayer.metadata.plan": "pro"})


# -- other tools' conventions (SPEC §4) --

@pytest.mark.parametrize(("attrs", "expected"), [
    ({"metadata": '{"plan": "pro", "seats": 3, "beta": true, "tags": ["a", "b"]}'},
     {"plan": "pro", "seats": "3", "beta": "true", "tags": '["a", "b"]'}),
    ({"traceloop.association.properties.tenant": "acme",
      "traceloop.association.properties.user_id": "u"}, {"tenant": "acme", "user_id": "u"}),
    ({"langfuse.trace.metadata.plan": '"pro"', "langfuse.observation.metadata.n": "3",
      "langfuse.observation.metadata.doc": '{"id":7}', "langfuse.trace.metadata.raw": "raw"},
     {"plan": "pro", "n": "3", "doc": '{"id":7}', "raw": "raw"}),
    ({"langfuse.user.id": "u", "langfuse.session.id": "s"},
     {"user_id": "u", "conversation_id": "s"}),
    ({"gen_ai.user": "end", "llm.user": "end", "gen_ai.request.user": "end"}, {}),  # weakest
    ({"langfuse_user_id": "u", "langfuse_metadata_plan": "p"}, {}),  # baggage names only
])
def test_each_tool_convention_maps_exactly(attrs, expected) -> None:
    assert mapped(attrs) == expected
    assert RULES.is_relevant(attrs) or attrs.keys() <= {"langfuse_user_id",
                                                        "langfuse_metadata_plan"}


def test_the_end_user_field_is_the_cross_layer_fallback() -> None:
    assert map_weakest({"llm.user": "c", "gen_ai.user": "b"}, RULES, Stats()) == {"user_id": "b"}
    assert map_weakest({"gen_ai.request.user": "a", "gen_ai.user": "b"}, RULES,
                       Stats()) == {"user_id": "a"}


def test_langfuse_baggage_maps_only_from_baggage() -> None:
    from otel_metadata.mapping import map_baggage

    bag = {"langfuse_user_id": "u", "langfuse_session_id": "s",
           "langfuse_metadata_plan": '"pro"', "langfuse_trace_id": "abc"}
    assert map_baggage(bag, RULES, Stats()) == {"user_id": "u", "conversation_id": "s",
                                                "plan": "pro"}
    assert RULES.is_relevant_baggage(bag) and not RULES.is_relevant_baggage({"x": "y"})


def test_tools_rank_below_promptlayer_standard_extra_and_fallback_names() -> None:
    rules = MappingRules(extra_attributes={"app.user": "user_id"})
    tools = {"langfuse.user.id": "lf", "traceloop.association.properties.user_id": "tl",
             "metadata": '{"user_id": "oi"}'}
    order = [("promptlayer.metadata.user_id", "explicit"), ("user.id", "standard"),
             ("app.user", "extra"), ("enduser.id", "fallback"), ("langfuse.user.id", "lf"),
             ("traceloop.association.properties.user_id", "tl"), ("metadata", "oi")]
    attrs = {**tools, **{name: value for name, value in order if name not in tools}}
    for name, value in order:  # remove the strongest each time: the next one shows
        assert mapped(attrs, rules) == {"user_id": value}
        del attrs[name]
    assert mapped({"langfuse.trace.metadata.k": "trace",
                   "langfuse.observation.metadata.k": "observation"}) == {"k": "observation"}


def test_conventions_none_reads_no_tool() -> None:
    from otel_metadata.conventions import chosen

    rules = MappingRules(conventions=chosen(()))
    assert mapped({"metadata": '{"a": "1"}', "langfuse.user.id": "u",
                   "traceloop.association.properties.a": "1"}, rules) == {}
    assert rules.context_keys == frozenset() and rules.weakest_steps == ()
    assert not rules.is_relevant({"metadata": "{}", "gen_ai.user": "u"})


@pytest.mark.parametrize(("value", "expected", "counted"), [
    ('["a", 1]', {"metadata": '["a", 1]'}, "json_not_object"),
    ("not json", {"metadata": "not json"}, "json_not_object"),
    ("3", {"metadata": "3"}, "json_not_object"),
    (5, {"metadata": "5"}, "json_not_object"),
    (("a", "b"), {"metadata": '["a", "b"]'}, "json_not_object"),
    ("[" * 100_000, {"metadata": "[" * 1024}, "json_not_object"),  # the parser's recursion
    ('{"o": {"deep": [1, {"x": "é"}]}, "l": [[1]], "n": null}',
     {"o": '{"deep": [1, {"x": "é"}]}', "l": "[[1]]"}, "json_nested_values"),
])
def test_a_json_attribute_that_is_not_a_flat_object_is_stringified_and_counted(
        value, expected, counted) -> None:
    stats = Stats()
    assert map_attributes({"metadata": value}, RULES, stats) == expected
    assert stats.snapshot()[counted] >= 1


@given(st.one_of(st.text(), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text()),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner)).map(json.dumps)))
def test_any_json_attribute_gives_str_to_str_and_never_raises(value) -> None:
    out = map_attributes({"metadata": value, "langfuse.trace.metadata.k": value}, RULES, Stats())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


span_names = st.lists(st.one_of(attribute_keys, st.sampled_from([
    "promptlayer.request_id", "gen_ai.user", "metadata", "langfuse.trace.metadata.k",
    "http.route"])), unique=True, max_size=6)


@given(st.lists(span_names, min_size=1, max_size=3), st.data())
def test_reading_a_span_plans_by_names_and_answers_by_its_own_values(name_sets, data) -> None:
    """Spans of a few kinds (names) with any values: `read` answers each as the separate
    functions do on fresh rules, whatever spans of the same names it read before."""
    learning = MappingRules(max_value_length=8)
    for _ in range(6):
        names = data.draw(st.sampled_from(name_sets))
        attrs = {name: data.draw(attribute_values) for name in names}
        fresh, stats = MappingRules(max_value_length=8), Stats()
        expected = (map_attributes(attrs, fresh, stats),
                    map_weakest(attrs, fresh, stats) or None,
                    request_id_of(attrs, fresh.request_id_attributes, stats))
        got = Stats()
        assert learning.read(attrs, got) == expected
        assert got.snapshot() == stats.snapshot()  # the same counted, said once


def test_plans_are_bounded_for_names_that_never_repeat(monkeypatch) -> None:
    monkeypatch.setattr(mapping, "MAX_PLANS", 4)
    rules = MappingRules()
    for n in range(20):  # an app that puts IDs in attribute names
        attrs = {f"promptlayer.metadata.k{n}": "v", "user.id": "u"}
        assert rules.read(attrs, Stats()) == ({"user_id": "u", f"k{n}": "v"}, None, None)
    assert len(rules._plans) <= 4
