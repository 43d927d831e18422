"""Which attribute names carry metadata, as data (SPEC §4).

A convention is an entry: exact attribute names and the metadata key each gives, prefixes whose
remainder is the key, and attributes holding a JSON object of metadata, with a rank that decides
between conventions within one layer (higher wins). `mapping.MappingRules` compiles the chosen
entries into the lookups the hot path uses, so a new tool's convention is one entry here.

Other tools' conventions (`TOOLS`) are chosen with the ``conventions`` setting; each ranks below
the PromptLayer and standard names and the user's ``extra_attributes``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

METADATA_PREFIX = "promptlayer.metadata."


@dataclass(frozen=True)
class Convention:
    """One source of metadata names."""

    name: str
    rank: int
    names: tuple[tuple[str, str], ...] = ()   # (attribute, metadata key)
    prefixes: tuple[str, ...] = ()            # attribute = prefix + metadata key
    json_objects: tuple[str, ...] = ()        # attribute = a JSON object of key -> value
    # attribute = prefix + metadata key, the value JSON-encoded when it is a JSON string
    json_prefixes: tuple[str, ...] = ()
    # Values the tool keeps in the OpenTelemetry context: (context key, attribute). A mapping
    # found there is read as the attributes ``attribute + <its key>``, another value as the
    # attribute itself; both then go through the rules like a span's attributes.
    context: tuple[tuple[str, str], ...] = ()
    baggage: bool = False   # read from W3C baggage entries only, never from attributes
    # Cross-layer: a key given this way is used only when no layer of SPEC §6 gives it.
    weakest: bool = False


# Ranks within one layer, strongest first: an explicit ``promptlayer.metadata.<key>``; the
# standard attributes; the user's ``extra_attributes``; the standard fallbacks; other tools.
EXPLICIT = Convention("promptlayer", 40, prefixes=(METADATA_PREFIX,))
STANDARD = Convention("standard", 30, names=(
    ("user.id", "user_id"),
    ("gen_ai.conversation.id", "conversation_id"),
))
EXTRA_RANK = 20  # `extra_attributes`, compiled as a convention of the user's own
FALLBACK = Convention("fallback", 10, names=(
    ("enduser.id", "user_id"),
    ("session.id", "conversation_id"),
))

BUILT_IN: tuple[Convention, ...] = (EXPLICIT, STANDARD, FALLBACK)

# Other tools, strongest first: a tool's dedicated ID attributes, then per-key attributes
# (an observation's own over its trace's), then a JSON blob.
LANGFUSE_IDS = Convention("langfuse", 9, names=(
    ("langfuse.user.id", "user_id"),
    ("langfuse.session.id", "conversation_id"),
))
LANGFUSE_BAGGAGE_IDS = Convention("langfuse", 9, baggage=True, names=(
    ("langfuse_user_id", "user_id"),
    ("langfuse_session_id", "conversation_id"),
))
LANGFUSE_OBSERVATION = Convention("langfuse", 8,
                                  json_prefixes=("langfuse.observation.metadata.",))
LANGFUSE_TRACE = Convention("langfuse", 7, json_prefixes=("langfuse.trace.metadata.",))
LANGFUSE_BAGGAGE_METADATA = Convention("langfuse", 7, baggage=True,
                                       json_prefixes=("langfuse_metadata_",))
# Traceloop's SDK keeps its association properties, a dict, under this plain context key
# (traceloop.sdk.tracing.tracing.set_association_properties) and copies them to every span.
TRACELOOP = Convention("traceloop", 6, prefixes=("traceloop.association.properties.",),
                       context=(("association_properties",
                                 "traceloop.association.properties."),))
# OpenInference's using_* helpers set these plain context keys (openinference.instrumentation.
# context_attributes); its instrumentors copy them to their spans as attributes of the same
# names. `user.id` and `session.id` then map as the standard names do.
OPENINFERENCE = Convention("openinference", 5, json_objects=("metadata",),
                           context=(("user.id", "user.id"), ("session.id", "session.id"),
                                    ("metadata", "metadata")))
# The LLM request's own end-user field, as instrumentations record it (OpenAI's `user`).
# Names of one rank apply in the order declared, the last standing: weakest first.
GENAI = Convention("genai", 1, weakest=True, names=(
    ("llm.user", "user_id"),
    ("gen_ai.user", "user_id"),
    ("gen_ai.request.user", "user_id"),
))

TOOLS: tuple[Convention, ...] = (
    LANGFUSE_IDS, LANGFUSE_BAGGAGE_IDS, LANGFUSE_OBSERVATION, LANGFUSE_TRACE,
    LANGFUSE_BAGGAGE_METADATA, TRACELOOP, OPENINFERENCE, GENAI,
)
TOOL_NAMES: tuple[str, ...] = ("openinference", "traceloop", "langfuse", "genai")
# Every context key any tool uses: what a source captures when it cannot know the rules.
CONTEXT_KEYS: frozenset[str] = frozenset(key for c in TOOLS for key, _ in c.context)


def chosen(names: Iterable[str]) -> tuple[Convention, ...]:
    """The built-in conventions plus the entries of the tools named (the setting's value)."""
    wanted = set(names)
    return BUILT_IN + tuple(c for c in TOOLS if c.name in wanted)


ALL: tuple[Convention, ...] = chosen(TOOL_NAMES)
