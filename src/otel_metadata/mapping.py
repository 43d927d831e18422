"""The mapping rules: which span attributes become which PromptLayer metadata (SPEC §3–5).

Pure functions over plain mappings, so in-process spans, baggage, resources and (later) spans
decoded from OTLP all go through the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .conventions import BUILT_IN, EXTRA_RANK, Convention
from .stats import Stats

REQUEST_ID_ATTRIBUTE = "promptlayer.request_id"
MAX_KEY_LENGTH = 1024
# Attribute names `MappingRules.is_relevant` remembers as irrelevant: a bound for apps that put
# IDs in attribute names (``llm.prompts.<n>.content``); past it, new names take the full test.
MAX_LEARNT_NAMES = 4096

RequestId = int | str

# One step of mapping a layer, applied weakest first so a stronger source overwrites:
# ("name", attribute, key) | ("prefix", prefix, "") | ("json", attribute, "").
_Step = tuple[str, str, str]


@dataclass(frozen=True)
class MappingRules:
    """What to read from attributes: the conventions compiled, plus `extra_attributes`."""

    request_id_attributes: tuple[str, ...] = (REQUEST_ID_ATTRIBUTE,)
    extra_attributes: Mapping[str, str] = field(default_factory=dict)
    max_value_length: int = 1024
    conventions: tuple[Convention, ...] = BUILT_IN
    # Exact attribute names that matter; a span with none of them and no prefixed key is skipped.
    relevant: frozenset[str] = field(init=False)
    prefixes: tuple[str, ...] = field(init=False)
    steps: tuple[_Step, ...] = field(init=False)
    # Names seen on spans that carried nothing for us (learnt by `is_relevant`, up to a bound).
    irrelevant: set[str] = field(init=False, default_factory=set, compare=False)

    def __post_init__(self) -> None:
        extra = Convention("extra_attributes", EXTRA_RANK,
                           names=tuple(self.extra_attributes.items()))
        ranked: list[tuple[int, _Step]] = []
        for c in (*self.conventions, extra):
            ranked += [(c.rank, ("name", a, k)) for a, k in c.names]
            ranked += [(c.rank, ("prefix", p, "")) for p in c.prefixes]
            ranked += [(c.rank, ("json", a, "")) for a in c.json_objects]
        ranked.sort(key=lambda r: r[0])  # stable: within a rank, as declared
        steps = tuple(step for _, step in ranked)
        names = {a for kind, a, _ in steps if kind != "prefix"}
        names.update(self.request_id_attributes)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "prefixes", tuple(a for kind, a, _ in steps if kind == "prefix"))
        object.__setattr__(self, "relevant", frozenset(names))

    def is_relevant(self, attributes: Mapping[str, Any]) -> bool:
        """Cheap test whether `attributes` could yield metadata or a request ID.

        Most spans carry nothing for us, and their attribute names repeat (semantic conventions):
        once learnt, such a span is told by one set test in C, and a span carrying a name the
        rules read by a second. Only names of spans found irrelevant are learnt, so a learnt name
        can never hide a relevant one. (`intake.Intake.ended` spells out the same expression.)
        """
        return not self.irrelevant.issuperset(attributes) and (
            not self.relevant.isdisjoint(attributes) or self.prefixed_or_learn(attributes))

    def prefixed_or_learn(self, attributes: Mapping[str, Any]) -> bool:
        """The rest of `is_relevant`: True if a name holds a metadata prefix; otherwise the
        names are learnt as irrelevant (up to `MAX_LEARNT_NAMES`)."""
        keys = tuple(attributes)  # iterate once: the SDK's attribute mapping iterates in Python
        joined = "\0".join(keys)
        if any(prefix in joined for prefix in self.prefixes):
            return True
        if len(self.irrelevant) < MAX_LEARNT_NAMES:
            self.irrelevant.update(keys)
        return False

    def relevant_items(self, attributes: Mapping[str, Any]) -> dict[str, Any]:
        """The attributes these rules read, in a plain dict.

        Mapping them gives the same result as mapping all of `attributes`, and a dict is much
        cheaper to probe than the SDK's attribute mapping (whose `in` raises and catches a
        KeyError per miss).
        """
        out = {k: attributes[k] for k in self.relevant.intersection(attributes)}
        joined = "\0".join(attributes)
        for prefix in self.prefixes:
            if prefix in joined:
                out.update((k, v) for k, v in attributes.items() if k.startswith(prefix))
        return out


def stringify(value: object) -> str | None:
    """OpenTelemetry's rule for non-OTLP exporters; None for a value no attribute can hold."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        try:
            return json.dumps(list(value), ensure_ascii=False)
        except (TypeError, ValueError):
            return None
    return None


def _put(out: dict[str, str], key: str, value: object, rules: MappingRules, stats: Stats) -> None:
    if not key:
        return
    if len(key) > MAX_KEY_LENGTH:
        stats.add("dropped_keys")
        stats.warn_once("key", key[:64], "otel-metadata: dropping metadata key longer than %d "
                        "characters (starts %r)", MAX_KEY_LENGTH, key[:64])
        return
    text = stringify(value)
    if text is None:
        stats.add("dropped_values")
        stats.warn_once("type", key, "otel-metadata: metadata %r has a value of type %s, which "
                        "is not an attribute type; dropped", key, type(value).__name__)
        return
    if len(text) > rules.max_value_length:
        stats.add("truncated_values")
        stats.warn_once("long", key, "otel-metadata: truncating metadata %r to %d characters",
                        key, rules.max_value_length)
        text = text[: rules.max_value_length]
    out[key] = text


def map_attributes(
    attributes: Mapping[str, Any], rules: MappingRules, stats: Stats
) -> dict[str, str]:
    """One layer's attributes → metadata, by the rules' steps (weakest first, so within a layer
    the stronger convention's value stands: SPEC §4)."""
    out: dict[str, str] = {}
    if not attributes:
        return out
    joined: str | None = None
    for kind, name, key in rules.steps:
        if kind == "name":
            if name in attributes:
                _put(out, key, attributes[name], rules, stats)
        elif kind == "prefix":
            if joined is None:
                joined = "\0".join(attributes)
            if name in joined:
                for attr, value in attributes.items():
                    if attr.startswith(name):
                        _put(out, attr[len(name):], value, rules, stats)
        elif name in attributes:
            _put_json(out, name, attributes[name], rules, stats)
    return out


def _put_json(out: dict[str, str], attr: str, value: object, rules: MappingRules,
              stats: Stats) -> None:
    """An attribute holding a JSON object of metadata: each member a key. Anything else (not
    JSON, not an object) is kept as the attribute's own value, stringified, and counted."""
    try:
        decoded = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict):
        stats.add("json_not_object")
        _put(out, attr, value, rules, stats)
        return
    for key, member in decoded.items():
        if isinstance(member, (dict, list)):
            member = json.dumps(member, ensure_ascii=False)
        if member is not None:
            _put(out, key, member, rules, stats)


def map_baggage(
    baggage: Mapping[str, object], rules: MappingRules, stats: Stats
) -> dict[str, str]:
    """Baggage entries → metadata, as attributes are mapped, each value the W3C value only.

    The SDK's propagator percent-decodes a whole list member, properties included
    (``user.id=bob%20smith;prop=1`` arrives as ``"bob smith;prop=1"``). A ``;`` cannot stand in
    a W3C value unencoded, so everything from the first one is a property and is removed.
    """
    values = {k: v.split(";", 1)[0].strip() if isinstance(v, str) else v
              for k, v in baggage.items()}
    return map_attributes(values, rules, stats)


def map_values(values: Mapping[str, object], rules: MappingRules, stats: Stats) -> dict[str, str]:
    """Metadata given directly by key (static `metadata=`, `metadata_context`), stringified."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is not None and isinstance(key, str):
            _put(out, key, value, rules, stats)
    return out


def check_request_id(request_id: object) -> RequestId:
    """Return `request_id` if PromptLayer accepts it (int, or non-empty str), else raise."""
    if request_id is None:
        raise TypeError("request_id is None; pass the int or str ID PromptLayer returned")
    if isinstance(request_id, bool) or not isinstance(request_id, (int, str)):
        raise TypeError(f"request_id must be an int or a non-empty str, not "
                        f"{type(request_id).__name__}")
    if isinstance(request_id, str) and not request_id.strip():
        raise ValueError("request_id must not be an empty string")
    return request_id


def request_id_of(
    attributes: Mapping[str, Any], names: Iterable[str], stats: Stats
) -> RequestId | None:
    """The first valid request ID among `names`; bad values are counted and never posted."""
    for name in names:
        if name in attributes:
            value = attributes[name]
            try:
                return check_request_id(value)
            except (TypeError, ValueError):
                stats.add("ignored_request_ids")
                stats.warn_once("request_id", type(value).__name__,
                                "otel-metadata: ignoring %s of type %s (%s); it must be an int "
                                "or a non-empty string", name, type(value).__name__,
                                "empty" if value == "" else "wrong type")
    return None
