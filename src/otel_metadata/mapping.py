"""The mapping rules: which span attributes become which PromptLayer metadata (SPEC §3–5).

Pure functions over plain mappings, so in-process spans, baggage, resources and (later) spans
decoded from OTLP all go through the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .conventions import ALL, EXTRA_RANK, Convention
from .stats import Stats

REQUEST_ID_ATTRIBUTE = "promptlayer.request_id"
MAX_KEY_LENGTH = 1024
# Attribute names `MappingRules.is_relevant` remembers as irrelevant: a bound for apps that put
# IDs in attribute names (``llm.prompts.<n>.content``); past it, new names take the full test.
MAX_LEARNT_NAMES = 4096
# Sets of attribute names whose plan `MappingRules.read` remembers (spans of one kind repeat
# their names); when full, it starts over, so names with IDs in them cost planning, not memory.
MAX_PLANS = 1024

RequestId = int | str

# One step of mapping a layer, applied weakest first so a stronger source overwrites:
# ("name", attribute, key) | ("prefix", prefix, "") | ("json", attribute, "")
# | ("jsonprefix", prefix, "").
_Step = tuple[str, str, str]
# A step resolved against the attribute names present (`_resolve`), one per attribute read:
# ("value", attribute, key) | ("json", attribute, "") | ("jsonvalue", attribute, key), the last
# a value that may be a JSON-encoded string; "value" only for a key `_put` takes, else "put".
_Op = tuple[str, str, str]
# What `MappingRules.read` does for one tuple of attribute names: the metadata ops, the
# cross-layer ops, the request-ID attributes present (in the rules' order).
_Plan = tuple[tuple[_Op, ...], tuple[_Op, ...], tuple[str, ...]]


@dataclass(frozen=True)
class MappingRules:
    """What to read from attributes: the conventions compiled, plus `extra_attributes`."""

    request_id_attributes: tuple[str, ...] = (REQUEST_ID_ATTRIBUTE,)
    extra_attributes: Mapping[str, str] = field(default_factory=dict)
    max_value_length: int = 1024
    conventions: tuple[Convention, ...] = ALL
    # Exact attribute names that matter; a span with none of them and no prefixed key is skipped.
    relevant: frozenset[str] = field(init=False)
    prefixes: tuple[str, ...] = field(init=False)
    steps: tuple[_Step, ...] = field(init=False)
    # Cross-layer steps (`Convention.weakest`): a key only when no layer gives it otherwise.
    weakest_steps: tuple[_Step, ...] = field(init=False)
    # Baggage: the attribute steps plus the baggage-only ones, and what makes baggage relevant.
    baggage_steps: tuple[_Step, ...] = field(init=False)
    baggage_relevant: frozenset[str] = field(init=False)
    baggage_prefixes: tuple[str, ...] = field(init=False)
    # Other tools' values in the OpenTelemetry context: (context key, attribute) pairs, and
    # the keys alone for the test a span's start makes.
    context: tuple[tuple[str, str], ...] = field(init=False)
    context_keys: frozenset[str] = field(init=False)
    # Names seen on spans that carried nothing for us (learnt by `is_relevant`, up to a bound).
    irrelevant: set[str] = field(init=False, default_factory=set, compare=False)
    _plans: dict[tuple[str, ...], _Plan] = field(init=False, default_factory=dict,
                                                 compare=False, repr=False)

    def __post_init__(self) -> None:
        extra = Convention("extra_attributes", EXTRA_RANK,
                           names=tuple(self.extra_attributes.items()))
        ranked: dict[str, list[tuple[int, _Step]]] = {"span": [], "baggage": [], "weakest": []}
        for c in (*self.conventions, extra):
            scope = ranked["weakest" if c.weakest else "baggage" if c.baggage else "span"]
            scope += [(c.rank, ("name", a, k)) for a, k in c.names]
            scope += [(c.rank, ("prefix", p, "")) for p in c.prefixes]
            scope += [(c.rank, ("json", a, "")) for a in c.json_objects]
            scope += [(c.rank, ("jsonprefix", p, "")) for p in c.json_prefixes]
        steps, weakest = _ordered(ranked["span"]), _ordered(ranked["weakest"])
        baggage = _ordered(ranked["span"] + ranked["baggage"])
        names = {a for kind, a, _ in steps + weakest if not kind.endswith("prefix")}
        names.update(self.request_id_attributes)
        context = tuple(pair for c in self.conventions for pair in c.context)
        for name, value in (
            ("steps", steps), ("weakest_steps", weakest), ("baggage_steps", baggage),
            ("prefixes", _prefixes(steps)), ("relevant", frozenset(names)),
            ("baggage_prefixes", _prefixes(baggage)),
            ("baggage_relevant", frozenset(a for kind, a, _ in baggage
                                           if not kind.endswith("prefix"))),
            ("context", context), ("context_keys", frozenset(key for key, _ in context)),
        ):
            object.__setattr__(self, name, value)

    def is_relevant_baggage(self, baggage: Mapping[str, Any]) -> bool:
        """Whether baggage entries could yield metadata (no learning: callers cache the answer
        per baggage object, which the context passes on unchanged)."""
        if not self.baggage_relevant.isdisjoint(baggage):
            return True
        joined = "\0".join(baggage)
        return any(prefix in joined for prefix in self.baggage_prefixes)

    def context_attributes(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Other tools' context values (captured by context key) as the attributes they stand
        for, to be mapped like a span's: a mapping's entries under the attribute prefix."""
        out: dict[str, Any] = {}
        for key, attribute in self.context:
            value = values.get(key)
            if isinstance(value, Mapping):
                out.update((attribute + str(k), v) for k, v in value.items())
            elif value is not None:
                out[attribute] = value
        return out

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

    def read(self, attributes: Mapping[str, Any],
             stats: Stats) -> tuple[dict[str, str], dict[str, str] | None, RequestId | None]:
        """A span's attributes → (`map_attributes`, `map_weakest` or None when empty,
        `request_id_of`), as those give them, reading only the attributes the rules name.

        What to read depends on the names alone, so it is planned once per tuple of names
        (the SDK's spans of one kind repeat theirs) and each span then costs a lookup plus the
        attributes that matter, instead of every rule tried against every span.
        """
        names = tuple(attributes)  # iterate once: the SDK's attribute mapping iterates in Python
        plan = self._plans.get(names)
        if plan is None:
            present = frozenset(names)
            plan = (_resolve(names, self.steps), _resolve(names, self.weakest_steps),
                    tuple(n for n in self.request_id_attributes if n in present))
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[names] = plan
        ops, weakest, id_names = plan
        return (_run(attributes, ops, self, stats) if ops else {},
                _run(attributes, weakest, self, stats) or None if weakest else None,
                request_id_of(attributes, id_names, stats) if id_names else None)


def _ordered(ranked: list[tuple[int, _Step]]) -> tuple[_Step, ...]:
    """Steps weakest first; within a rank, as declared (the sort is stable)."""
    return tuple(step for _, step in sorted(ranked, key=lambda r: r[0]))


def _prefixes(steps: tuple[_Step, ...]) -> tuple[str, ...]:
    return tuple(a for kind, a, _ in steps if kind.endswith("prefix"))


def stringify(value: object) -> str | None:
    """OpenTelemetry's rule for non-OTLP exporters; None for a value no attribute can hold.
    Text is always a plain `str`: an app's own string type (a StrEnum, say) gives its text."""
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)  # the text itself, whatever the subclass's own __str__ says
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
    return _map(attributes, rules.steps, rules, stats)


def map_weakest(
    attributes: Mapping[str, Any], rules: MappingRules, stats: Stats
) -> dict[str, str]:
    """The cross-layer keys of a span's attributes (`Convention.weakest`, the LLM request's own
    end-user field): the join uses them only when no layer gives the key otherwise."""
    return _map(attributes, rules.weakest_steps, rules, stats) if rules.weakest_steps else {}


def _map(attributes: Mapping[str, Any], steps: tuple[_Step, ...], rules: MappingRules,
         stats: Stats) -> dict[str, str]:
    if not attributes:
        return {}
    return _run(attributes, _resolve(tuple(attributes), steps), rules, stats)


def _resolve(names: tuple[str, ...], steps: tuple[_Step, ...]) -> tuple[_Op, ...]:
    """`steps` (weakest first) against the attribute names present: what to read, in order."""
    present = frozenset(names)
    ops: list[_Op] = []
    for kind, name, key in steps:
        if kind == "name":
            if name in present:
                ops.append((_value_op(key), name, key))
        elif kind == "json":
            if name in present:
                ops.append(("json", name, ""))
        elif kind == "jsonprefix":  # values may be JSON-encoded strings
            ops += [("jsonvalue", a, a[len(name):]) for a in names if a.startswith(name)]
        else:
            ops += [(_value_op(a[len(name):]), a, a[len(name):])
                    for a in names if a.startswith(name)]
    return tuple(ops)


def _value_op(key: str) -> str:
    """"value" for a key `_put` would keep (its values then need only their own test), else
    "put" (`_put` drops it, counted, each time)."""
    return "value" if 0 < len(key) <= MAX_KEY_LENGTH else "put"


def _run(attributes: Mapping[str, Any], ops: tuple[_Op, ...], rules: MappingRules,
         stats: Stats) -> dict[str, str]:
    out: dict[str, str] = {}
    limit = rules.max_value_length
    for read, attr, key in ops:
        value = attributes[attr]
        if read == "value" and type(value) is str and len(value) <= limit:
            out[key] = value  # the common case, as `_put` puts it, without two calls
        elif read == "json":
            _put_json(out, attr, value, rules, stats)
        elif read == "jsonvalue":
            _put(out, key, _json_string(value), rules, stats)
        else:
            _put(out, key, value, rules, stats)
    return out


def _json_string(value: object) -> object:
    """A value JSON-encoded as a string (Langfuse writes ``'"pro"'`` for ``"pro"``) decoded;
    others as they are (a JSON number, boolean or array already reads as its own text)."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(decoded, str):
            return decoded
    return value


def _put_json(out: dict[str, str], attr: str, value: object, rules: MappingRules,
              stats: Stats) -> None:
    """An attribute holding a JSON object of metadata: each member a key (SPEC §4).

    Anything else (not a string, not JSON, not an object) is kept as the attribute's own value,
    stringified by SPEC §5 and counted (``json_not_object``). A member no attribute could hold
    (an object, or an array holding arrays or objects) is its JSON text, counted
    (``json_nested_values``); a null member is no value. Never raises.
    """
    try:
        decoded = json.loads(value) if isinstance(value, str) else None
    except (ValueError, RecursionError):  # a deeply nested document exhausts the parser
        decoded = None
    if not isinstance(decoded, dict):
        stats.add("json_not_object")
        _put(out, attr, value, rules, stats)
        return
    for key, member in decoded.items():
        if member is None:
            continue
        if isinstance(member, dict) or (
                isinstance(member, list) and any(isinstance(m, (dict, list)) for m in member)):
            stats.add("json_nested_values")
            try:
                member = json.dumps(member, ensure_ascii=False)
            except (ValueError, RecursionError):
                stats.add("dropped_values")
                continue
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
    return _map(values, rules.baggage_steps, rules, stats)


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
