"""`--precision FILE`: a hand-written per-layer precision map (JSON).

    {"*fc2*": 8, "/MatMul_16": {"weights": 8}, "*conv1*": "float",
     "*layers.3/fc2*": {"activations": "float"}}

Keys are fnmatch patterns on node names, tried in file order (the first entry that sets
a field wins); a value is weight bits (8, 4, 2, "float") or an object with any of
`weights`, `block_size`, `activations`. A key "GRAPH:pattern" (`decoder:/k_proj/MatMul`)
applies to that graph of a multi-graph model only (`quant.plan.entries_for_graph`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SfcError
from ..quant.plan import LayerPrecision
from ..serial import read_text

__all__ = ["load_precision"]


def load_precision(path: Path) -> tuple[LayerPrecision, ...]:
    """The entries of a precision map file; one-line SfcErrors for anything malformed."""
    text = read_text(path, "precision map")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SfcError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise SfcError(f"{path}: a precision map is a non-empty JSON object of "
                       "pattern -> bits or {weights, block_size, activations}")
    entries = []
    for pattern, value in data.items():
        if isinstance(value, dict):
            entries.append(LayerPrecision.from_dict({"pattern": pattern, **value}))
        elif isinstance(value, int | str) and not isinstance(value, bool):
            entries.append(LayerPrecision(pattern, weights=value))
        else:
            raise SfcError(f"{path}: entry '{pattern}' must be 8, 4, 2, 'float' or an "
                           "object")
    return tuple(entries)
