"""Versioned JSON envelopes `{"_type", "_version", "_data"}` for every saved structure.

Loading resolves only the types a module declares (an allowlist), never a free import.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import SfcError

__all__ = ["read_text", "unwrap"]


def unwrap(obj: Any, expected: str, known: Mapping[str, int], what: str = "file") -> dict[str, Any]:
    """Check an envelope against `known` (type -> version) and return its payload."""
    if not isinstance(obj, dict) or not {"_type", "_version", "_data"} <= obj.keys():
        raise SfcError(f"not an sfc {what}: expected keys _type, _version and _data")
    kind = obj["_type"]
    if kind not in known:
        raise SfcError(f"unknown {what} type {kind!r}")
    if kind != expected:
        raise SfcError(f"expected a {expected}, got a {kind}")
    if obj["_version"] != known[kind]:
        raise SfcError(f"unsupported {kind} version {obj['_version']!r} "
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
