"""Telemetry: one UTF-8 JSON object whose numeric fields are metrics (CONTRACT.md, Telemetry).

Decisions:
- Numbers become floats, booleans 0.0/1.0; strings, null, arrays and nested objects are
  ignored. A duplicated key keeps its last value (JSON's usual rule).
- NaN, Infinity, -Infinity and numbers that overflow a float (1e999) are rejected wherever
  they appear, also inside ignored nested fields: the producer is broken either way.
- A leading byte-order mark is not JSON (RFC 8259) and is rejected as not_json.
- Objects and arrays nested deeper than `TelemetryLimits.max_depth` (32) are rejected as
  telemetry_too_deep before parsing: valid JSON, but no device sends it, and Python's
  parser would otherwise call 1,000 levels not JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import NoReturn

from pipeline.decode.errors import Reason, invalid, preview, undecodable


@dataclass(frozen=True, slots=True)
class TelemetryLimits:
    max_bytes: int = 64 * 1024
    max_depth: int = 32


class _NonFinite(Exception):
    """Raised from inside json.loads; becomes RejectedRecord(telemetry_non_finite)."""


def parse_telemetry(value: bytes, limits: TelemetryLimits = TelemetryLimits()) -> dict[str, float]:
    """The numeric metrics of one telemetry record; raises only RejectedRecord."""
    if not value:
        raise invalid(Reason.EMPTY_VALUE, "telemetry record has an empty value; send JSON")
    if len(value) > limits.max_bytes:
        raise invalid(
            Reason.TELEMETRY_TOO_LARGE,
            f"telemetry is {len(value)} bytes, over the {limits.max_bytes}-byte limit; "
            "send fewer metrics per record",
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise undecodable(
            Reason.TELEMETRY_NOT_UTF8,
            f"telemetry is not UTF-8 ({exc.reason} at byte {exc.start}); encode JSON as UTF-8",
        ) from None
    _check_depth(text, limits.max_depth)
    document = _loads(text, value)
    if not isinstance(document, dict):
        raise undecodable(
            Reason.TELEMETRY_NOT_OBJECT,
            f"telemetry is a JSON {type(document).__name__}, not an object; send "
            '{"metric": number, ...}',
        )
    return _metrics(document)


def _check_depth(text: str, max_depth: int) -> None:
    """Reject nesting deeper than `max_depth` (brackets inside strings do not count)."""
    if text.count("{") + text.count("[") <= max_depth:
        return  # cannot nest deeper: the common case costs two counts
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            if depth > max_depth:
                raise invalid(
                    Reason.TELEMETRY_TOO_DEEP,
                    f"telemetry nests objects or arrays deeper than {max_depth} levels; send "
                    "a flat JSON object of metrics",
                )
        elif ch in "}]":
            depth -= 1


def _loads(text: str, value: bytes) -> object:
    try:
        document: object = json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite, parse_int=_finite
        )
    except _NonFinite as exc:
        raise undecodable(
            Reason.TELEMETRY_NON_FINITE,
            f"telemetry holds a non-finite number ({exc}); send finite numbers, or omit a "
            "metric that has no value",
        ) from None
    except Exception as exc:  # JSONDecodeError, RecursionError (deep nesting), ...
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise undecodable(
            Reason.TELEMETRY_NOT_JSON,
            f"telemetry is not valid JSON ({detail}; starts {preview(value)}); "
            "send one JSON object",
        ) from exc
    return document


def _reject_constant(name: str) -> NoReturn:
    raise _NonFinite(name)


def _finite(literal: str) -> float:
    number = float(literal)  # "1e999" -> inf; huge integer literals too, without int limits
    if not math.isfinite(number):
        raise _NonFinite(f"{literal[:40]} overflows a float")
    return number


def _metrics(document: dict[object, object]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, field in document.items():
        if not isinstance(name, str):
            continue
        if isinstance(field, bool):  # before float: bool is an int subclass
            metrics[name] = 1.0 if field else 0.0
        elif isinstance(field, float):  # every JSON number: parse_int/parse_float -> float
            metrics[name] = field
    return metrics
