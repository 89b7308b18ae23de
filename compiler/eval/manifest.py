"""Read evaluation manifests: one JSON object per line describing an utterance.

Format (``manifest.jsonl``)::

    {"audio": "audio/0001.flac", "text": "...", "voice": "...", "condition": "...",
     "duration_s": 3.4, "id": "0001", ...any extra keys...}

``audio`` and ``text`` are required; ``audio`` is relative to the manifest's folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import SfcError

MANIFEST_NAME = "manifest.jsonl"
UNKNOWN = "unknown"

# Keys that become Utterance fields; everything else lands in `extra`.
_KNOWN_KEYS = frozenset({"audio", "text", "voice", "condition", "duration_s", "id"})


def _empty_extra() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Utterance:
    """One evaluation utterance: an absolute audio path and its reference transcript."""

    id: str
    audio: Path
    text: str
    voice: str = UNKNOWN
    condition: str = UNKNOWN
    duration_s: float | None = None
    extra: Mapping[str, Any] = field(default_factory=_empty_extra)


def _manifest_file(path: Path) -> Path:
    """Resolve a folder holding ``manifest.jsonl`` or the ``.jsonl`` file itself."""
    candidate = path / MANIFEST_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise SfcError(f"manifest not found: {candidate}")
    return candidate


def _optional_str(row: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise SfcError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _parse_row(row: Any, base: Path, where: str) -> Utterance:
    if not isinstance(row, dict):
        raise SfcError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("audio", "text"):
        if key not in row:
            raise SfcError(f"{where}: missing required key '{key}'")
        if not isinstance(row[key], str):
            raise SfcError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")

    audio = (base / row["audio"]).resolve()
    if not audio.is_file():
        raise SfcError(f"{where}: audio file not found: {audio}")

    duration = row.get("duration_s")
    # bool is an int subclass; a true/false duration is a data bug, not a number.
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, int | float)
    ):
        raise SfcError(f"{where}: 'duration_s' must be a number or null")

    return Utterance(
        id=_optional_str(row, "id", audio.stem, where),
        audio=audio,
        text=row["text"],
        voice=_optional_str(row, "voice", UNKNOWN, where),
        condition=_optional_str(row, "condition", UNKNOWN, where),
        duration_s=None if duration is None else float(duration),
        extra=MappingProxyType({k: v for k, v in row.items() if k not in _KNOWN_KEYS}),
    )


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a manifest (a folder holding ``manifest.jsonl``, or the file itself).

    Blank lines are skipped. Raises `SfcError` for a missing manifest, a line that is
    not a JSON object (naming its line number), a missing ``audio``/``text`` key, a
    referenced audio file that does not exist, duplicate ids, or an empty manifest.
    """
    manifest = _manifest_file(Path(path))
    base = manifest.parent.resolve()
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SfcError(f"cannot read manifest {manifest}: {exc}") from exc

    utterances: list[Utterance] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SfcError(f"{where}: invalid JSON on line {lineno}: {exc.msg}") from exc
        utt = _parse_row(row, base, where)
        # Ids key per-utterance results and paired comparisons, so they must be unique.
        if utt.id in seen:
            raise SfcError(f"{where}: duplicate id '{utt.id}' (first on line {seen[utt.id]})")
        seen[utt.id] = lineno
        utterances.append(utt)

    if not utterances:
        raise SfcError(f"manifest is empty: {manifest}")
    return utterances
