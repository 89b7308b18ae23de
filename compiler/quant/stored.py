"""Weights whose integers cannot be recomputed from the FP32 weights alone.

Round-to-nearest weights (`absmax`, `mse`) are recomputed from the FP32 model by the QDQ
writer, so a recipe only names the method. Methods that need calibration data (GPTQ's
error compensation uses each layer's input Gram matrix) or training (issue 11's learned
weights) store their integers and scales instead: `weights.npz` beside `recipe.json`,
pinned by a content digest in the recipe, so a replay writes the same QDQ file.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import SfcError
from .spec import QuantSpec
from .weights import check_integers, scale_shape, stored_scales

__all__ = ["LEARNED", "STORED_FILE", "STORED_METHODS", "StoredWeights", "load_named",
           "save_named"]

LEARNED = "learned"  # integers and scales trained by the one-stage search
STORED_METHODS = frozenset({"gptq", LEARNED})
STORED_FILE = "weights.npz"


def save_named(path: Path, arrays: Mapping[str, Sequence[np.ndarray]], keys: str) -> None:
    """Write name -> arrays atomically as one `.npz`: the names in `names`, the k-th array
    of the i-th name (sorted) as `keys[k]` + i (tensor names may hold '/')."""
    names = sorted(arrays)
    data: dict[str, np.ndarray] = {"names": np.array(names, dtype=np.str_)}
    for i, name in enumerate(names):
        for key, a in zip(keys, arrays[name], strict=True):
            data[f"{key}{i}"] = a
    with atomic_path(Path(path)) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **data)  # type: ignore[arg-type]


def load_named(path: Path, keys: str, what: str, needs: str) -> dict[str, tuple[np.ndarray, ...]]:
    """Read what `save_named` wrote; a missing or unreadable file is a one-line SfcError
    naming `what` (`needs`: "it" or "them", what the recipe needs)."""
    path = Path(path)
    if not path.is_file():
        raise SfcError(f"{what} not found: {path} (the recipe needs {needs})")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(n) for n in data["names"]]
            return {n: tuple(data[f"{k}{i}"] for k in keys) for i, n in enumerate(names)}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise SfcError(f"cannot read {what} {path}: {exc}") from None


@dataclass(frozen=True)
class StoredWeights:
    """tensor -> (int8 integers as sfc carries them, `check_integers`; float32 scales in DQ
    layout)."""

    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]]

    def digest(self) -> str:
        """sha256 over names, dtypes, shapes and bytes in name order (the zip's own bytes
        carry timestamps, so the file is not hashed)."""
        h = hashlib.sha256()
        for name in sorted(self.arrays):
            h.update(name.encode() + b"\0")
            for a in self.arrays[name]:
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(a.tobytes())
        return h.hexdigest()

    def get(self, tensor: str, spec: QuantSpec, shape: tuple[int, ...]) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
        """The stored pair for `tensor`, checked against the weight it replaces."""
        if tensor not in self.arrays:
            raise SfcError(f"stored weights lack '{tensor}'")
        q, scales = self.arrays[tensor]
        if q.shape != shape or scales.shape != scale_shape(shape, spec):
            raise SfcError(f"stored weights for '{tensor}' have shapes {q.shape} / "
                           f"{scales.shape}, expected {shape} / {scale_shape(shape, spec)}")
        reason = check_integers(q, spec)
        if reason is not None:
            raise SfcError(f"stored integers for '{tensor}': {reason}")
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise SfcError(f"stored scales for '{tensor}' must be finite and > 0")
        if not np.array_equal(stored_scales(scales, spec), scales):
            raise SfcError(f"stored scales for '{tensor}' are not {spec.scale_bits}-bit values")
        return q, scales

    def save(self, path: Path) -> None:
        save_named(path, {n: (np.asarray(q, np.int8), np.asarray(s, np.float32))
                          for n, (q, s) in self.arrays.items()}, "qs")

    @classmethod
    def load(cls, path: Path, digest: str) -> StoredWeights:
        """Read `path` and check it against the recipe's `digest`."""
        arrays = load_named(path, "qs", "stored weights", "them")
        stored = cls({n: (q, s) for n, (q, s) in arrays.items()})
        if stored.digest() != digest:
            raise SfcError(f"{path} does not match its recipe (digest {stored.digest()[:12]}, "
                           f"recipe {digest[:12]})")
        return stored
