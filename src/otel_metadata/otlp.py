"""OTLP trace export requests -> the intake's plain spans (SPEC §10).

Pure functions: `decode_protobuf` reads an `ExportTraceServiceRequest` (binary protobuf, as
OTLP/gRPC and `application/x-protobuf` carry it), `decode_json` reads OTLP/JSON, and both give
the same `Decoded`. OTLP/JSON is protobuf's JSON mapping with OTLP's deviations, which is why it is
not read with `json_format`: trace and span IDs are hex strings (not base64), enums are integers,
field names are lowerCamelCase, unknown fields are ignored. 64-bit integers may be numbers or
decimal strings, as in protobuf's mapping.

Attribute values become Python attribute values: strings, booleans, ints, doubles, and homogeneous
arrays of them as tuples. What an SDK attribute cannot hold is stringified the way SPEC §5 (and
OpenTelemetry's rule for non-OTLP exporters) says: a key-value list as a JSON object string, bytes
as base64, an array of mixed or nested values as a JSON array string. An empty value carries
nothing and its key is left out.

In fleet mode the receiver sees every service's spans of a trace, so a span's parent is never
"remote" for lineage: `parent` is `Parent(trace_id, parent_span_id, False)`, or None for a root.
A span with an invalid trace or span ID is refused (counted in `rejected`, with a reason); a body
that does not decode raises `DecodeError`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple, cast

from google.protobuf.message import DecodeError as _ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ProtoResource
from opentelemetry.sdk.resources import Resource
from opentelemetry.util.types import AttributeValue

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Distinct resources remembered, so a resource sent again (every request of a service carries
# its own) becomes the same `Resource` object, which the pipeline maps once.
_RESOURCE_CACHE = 1024


class DecodeError(ValueError):
    """The body is not an OTLP trace export request (the receivers answer 400)."""


class Parent(NamedTuple):
    """A span's parent, as the intake takes it (an SDK `SpanContext` reads the same way)."""

    trace_id: int
    span_id: int
    is_remote: bool


class Span(NamedTuple):
    """One decoded span: what `Intake.ended` takes (`started` is always None from OTLP)."""

    trace_id: int
    span_id: int
    parent: Parent | None
    attrs: dict[str, AttributeValue]
    resource: Resource


class Decoded(NamedTuple):
    """The spans of one request; `rejected` spans were refused for `error` (the first reason)."""

    spans: list[Span]
    rejected: int = 0
    error: str = ""


class _Rejects:
    """Counts refused spans and keeps the first reason, for OTLP's partial success."""

    __slots__ = ("count", "reason")

    def __init__(self) -> None:
        self.count = 0
        self.reason = ""

    def add(self, reason: str) -> None:
        self.count += 1
        if not self.reason:
            self.reason = reason


# -- binary protobuf --


def decode_protobuf(body: bytes) -> Decoded:
    """Decode a binary `ExportTraceServiceRequest`."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (_ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError(f"not an OTLP ExportTraceServiceRequest (protobuf): {exc}") from exc
    return spans_of_request(request)


def spans_of_request(request: ExportTraceServiceRequest) -> Decoded:
    """The spans of an already parsed request (OTLP/gRPC hands one over)."""
    spans: list[Span] = []
    rejects = _Rejects()
    for resource_spans in request.resource_spans:
        resource = _resource_from_proto(resource_spans.resource.SerializeToString(),
                                        resource_spans.schema_url)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                trace_id = span.trace_id
                span_id = span.span_id
                parent_id = span.parent_span_id
                if len(trace_id) != 16 or len(span_id) != 8 or len(parent_id) not in (0, 8):
                    rejects.add(_bad_id_reason(len(trace_id), len(span_id), len(parent_id)))
                    continue
                tid = int.from_bytes(trace_id, "big")
                sid = int.from_bytes(span_id, "big")
                if not tid or not sid:
                    rejects.add("a span has an all-zero trace or span ID")
                    continue
                pid = int.from_bytes(parent_id, "big") if parent_id else 0
                attrs = _proto_attributes(span.attributes) if span.attributes else {}
                spans.append(Span(tid, sid, Parent(tid, pid, False) if pid else None, attrs,
                                  resource))
    return Decoded(spans, rejects.count, rejects.reason)


def _bad_id_reason(trace_len: int, span_len: int, parent_len: int) -> str:
    return (f"a span has an invalid ID (trace_id {trace_len} bytes, span_id {span_len}, "
            f"parent_span_id {parent_len}; expected 16, 8, and 8 or none)")


@lru_cache(maxsize=_RESOURCE_CACHE)
def _resource_from_proto(raw: bytes, schema_url: str) -> Resource:
    proto = ProtoResource()
    proto.ParseFromString(raw)
    return Resource(_proto_attributes(proto.attributes), schema_url or None)


def _proto_attributes(key_values: Any) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {}
    for kv in key_values:  # the hottest loop of a receiver: no call per attribute
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "string_value":
            out[kv.key] = value.string_value
        elif kind in _SCALARS:
            out[kv.key] = getattr(value, kind)
        elif kind is not None:  # an empty value carries nothing
            out[kv.key] = _as_attribute(_proto_plain(value))
    return out


_SCALARS = frozenset({"bool_value", "int_value", "double_value"})


def _proto_plain(value: AnyValue) -> object:
    """A value as plain JSON-able data (bytes as base64), for nested arrays and lists."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_proto_plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _proto_plain(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, kind) if kind is not None else None


# -- OTLP/JSON --


def decode_json(body: bytes | str) -> Decoded:
    """Decode an OTLP/JSON `ExportTraceServiceRequest`."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise DecodeError(f"not JSON: {exc}") from exc
    spans: list[Span] = []
    rejects = _Rejects()
    cache: dict[str, Resource] = {}
    for resource_spans in _list(_object(doc, "request"), "resourceSpans"):
        resource_spans = _object(resource_spans, "resourceSpans[]")
        resource = _json_resource(resource_spans, cache)
        for scope_spans in _list(resource_spans, "scopeSpans"):
            for span in _list(_object(scope_spans, "scopeSpans[]"), "spans"):
                span = _object(span, "spans[]")
                tid = _hex_id(span.get("traceId"), 16)
                sid = _hex_id(span.get("spanId"), 8)
                raw_parent = span.get("parentSpanId")
                pid = _hex_id(raw_parent, 8) if raw_parent else 0
                if not tid or not sid or pid is None:
                    rejects.add("a span has a missing, invalid or all-zero traceId/spanId/"
                                "parentSpanId (expected 32 and 16 hex digits)")
                    continue
                attrs = _json_attributes(span.get("attributes"))
                spans.append(Span(tid, sid, Parent(tid, pid, False) if pid else None, attrs,
                                  resource))
    return Decoded(spans, rejects.count, rejects.reason)


def _json_resource(resource_spans: Mapping[str, Any], cache: dict[str, Resource]) -> Resource:
    raw = resource_spans.get("resource")
    schema_url = resource_spans.get("schemaUrl")
    key = json.dumps([raw, schema_url], sort_keys=True)
    resource = cache.get(key)
    if resource is None:
        attrs = _json_attributes(_object(raw, "resource").get("attributes")) if raw else {}
        if schema_url is not None and not isinstance(schema_url, str):
            raise DecodeError("schemaUrl is not a string")
        resource = cache[key] = Resource(attrs, schema_url or None)
    return resource


def _object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise DecodeError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _list(obj: Mapping[str, Any], name: str) -> Sequence[Any]:
    value = obj.get(name)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DecodeError(f"{name}: expected a JSON array, got {type(value).__name__}")
    return value


def _hex_id(value: object, size: int) -> int | None:
    """A hex ID of `size` bytes as an int (0 when all zero); None when invalid."""
    if not isinstance(value, str) or len(value) != 2 * size:
        return None
    try:
        return int.from_bytes(bytes.fromhex(value), "big")
    except ValueError:
        return None


def _json_attributes(key_values: object) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {}
    if key_values is None:
        return out
    if not isinstance(key_values, list):
        raise DecodeError("attributes: expected a JSON array")
    for kv in key_values:
        kv = _object(kv, "attributes[]")
        key = kv.get("key")
        if not isinstance(key, str):
            raise DecodeError("attributes[].key: expected a string")
        value = _json_plain(kv.get("value"))
        if value is not None:
            out[key] = _as_attribute(value)
    return out


def _json_plain(value: object) -> object:
    """An AnyValue in OTLP/JSON as plain data (None when empty), checked as the schema says."""
    if value is None:
        return None
    value = _object(value, "AnyValue")
    for kind, raw in value.items():  # a oneof: the first field we know decides
        if kind == "stringValue":
            if not isinstance(raw, str):
                raise DecodeError("stringValue: expected a string")
            return raw
        if kind == "boolValue":
            if not isinstance(raw, bool):
                raise DecodeError("boolValue: expected true or false")
            return raw
        if kind == "intValue":
            return _json_int(raw)
        if kind == "doubleValue":
            return _json_double(raw)
        if kind == "bytesValue":
            return _json_bytes(raw)
        if kind == "arrayValue":
            return [_json_plain(v) for v in _list(_object(raw, "arrayValue"), "values")]
        if kind == "kvlistValue":
            out: dict[str, object] = {}
            for kv in _list(_object(raw, "kvlistValue"), "values"):
                kv = _object(kv, "kvlistValue.values[]")
                key = kv.get("key")
                if not isinstance(key, str):
                    raise DecodeError("kvlistValue.values[].key: expected a string")
                out[key] = _json_plain(kv.get("value"))
            return out
    return None  # no known field: an empty value (unknown fields are ignored)


def _json_int(raw: object) -> int:
    value: int | None = None
    digits = raw.removeprefix("-") if isinstance(raw, str) else ""
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif (isinstance(raw, float) and raw.is_integer()) or (digits.isascii() and digits.isdigit()):
        value = int(cast(Any, raw))
    if value is None or not _INT64_MIN <= value <= _INT64_MAX:
        raise DecodeError(f"intValue: expected a 64-bit integer, got {raw!r:.40}")
    return value


def _json_double(raw: object) -> float:
    if isinstance(raw, str):  # "NaN", "Infinity", "-Infinity", or a number in a string
        with contextlib.suppress(ValueError):
            raw = json.loads(raw)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise DecodeError(f"doubleValue: expected a number, got {raw!r:.40}")
    return float(raw)


def _json_bytes(raw: object) -> str:
    """bytesValue is base64 (standard or URL-safe, as protobuf's JSON mapping allows); it is
    stringified as standard base64."""
    if not isinstance(raw, str):
        raise DecodeError("bytesValue: expected a base64 string")
    try:
        data = base64.b64decode(raw.replace("-", "+").replace("_", "/")
                                + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError("bytesValue: not base64") from exc
    return base64.b64encode(data).decode("ascii")


# -- shared --


def _as_attribute(value: object) -> AttributeValue:
    """Plain data -> an SDK attribute value; what none can hold becomes a JSON string."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list):
        kinds = {type(v) for v in value}
        if len(kinds) <= 1 and kinds <= {str, bool, int, float}:
            return tuple(value)
    return json.dumps(value, ensure_ascii=False)
