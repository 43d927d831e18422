"""Which attribute names carry metadata, as data (SPEC §4).

A convention is an entry: exact attribute names and the metadata key each gives, prefixes whose
remainder is the key, and attributes holding a JSON object of metadata, with a rank that decides
between conventions within one layer (higher wins). `mapping.MappingRules` compiles the chosen
entries into the lookups the hot path uses, so a new tool's convention is one entry here.
"""

from __future__ import annotations

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


# Ranks within one layer, strongest first: an explicit ``promptlayer.metadata.<key>``; the
# standard attributes; the user's ``extra_attributes``; the standard fallbacks.
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
