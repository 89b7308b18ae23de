"""Versioned JSON envelopes `{"_type", "_version", "_data"}` for every saved structure.

Loading resolves only the types a module declares (an allowlist), never a free import.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import SfcError, first_line

__all__ = ["parse_json", "read_json", "read_text", "unwrap"]


def unwrap(obj: Any, expected: str, known: Mapping[str, int], what: str = "file") -> dict[str, Any]:
    """Check an envelope against `known` (type -> version) and return its payload."""
    if not isinstance(obj, dict) or not {"_type", "_version", "_data"} <= obj.keys():
        raise SfcError(f"not an sfc {what}: expected keys _type, _version and _data")
    kind, version = obj["_type"], obj["_version"]
    if not isinstance(kind, str) or kind not in known:
        raise SfcError(f"unknown {what} type {reprlib.repr(kind)}")
    if kind != expected:
        raise SfcError(f"expected a {expected}, got a {kind}")
    # bool is an int and 1.0 == 1: a version is an int, compared exactly.
    if type(version) is not int or version != known[kind]:
        raise SfcError(f"unsupported {kind} version {reprlib.repr(version)} "
                       f"(expected {known[kind]})")
    if not isinstance(obj["_data"], dict):
        raise SfcError(f"malformed {kind}: _data is not an object")
    return obj["_data"]


def read_text(path: str | Path, what: str) -> str:
    """A saved file's text; a missing or unreadable file is a one-line SfcError."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SfcError(f"{what} not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SfcError(f"cannot read {what} {p}: {exc}") from None


def parse_json(text: str, what: str) -> Any:
    """`text` as JSON; anything json refuses is a one-line SfcError naming `what`.

    Besides malformed text (JSONDecodeError) that covers the documents json cannot hold:
    an integer of more than 4300 digits (ValueError) and nesting deeper than Python's
    recursion limit (RecursionError).
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SfcError(f"{what} is not valid JSON: {first_line(exc)}") from None


def read_json(path: str | Path, what: str) -> Any:
    """A saved JSON file's content (`read_text`, then `parse_json`)."""
    return parse_json(read_text(path, what), f"{what} {path}")
