"""Probe results memoised in a JSON checkpoint, so an interrupted search resumes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..atomic import write_json_atomic

__all__ = ["Memo"]


class Memo:
    """name -> float, each computed once; with a `checkpoint`, saved after every new value
    and read back when the file's `key` matches (another model or method: measured afresh)."""

    def __init__(self, checkpoint: Path | None = None, key: str = "") -> None:
        self.checkpoint, self.key = checkpoint, key
        self.done: dict[str, float] = {}
        if checkpoint is not None and checkpoint.is_file():
            try:
                saved = json.loads(checkpoint.read_text())
                if saved.get("key") == key:
                    self.done = {str(k): float(v) for k, v in saved["probes"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                self.done = {}  # a damaged checkpoint only costs the probes again

    def get(self, name: str, compute: Callable[[], float]) -> float:
        if name not in self.done:
            self.put(name, compute())
        return self.done[name]

    def put(self, name: str, value: float) -> None:
        """Record `value` for `name` (and save the checkpoint)."""
        self.done[name] = float(value)
        if self.checkpoint is not None:
            write_json_atomic(self.checkpoint, {"key": self.key, "probes": self.done})
