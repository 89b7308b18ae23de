"""Reader for CTranslate2 `model.bin` files (the format of the packaged Whisper weights).

Layout (ctranslate2/specs/model_spec.py `_serialize`, little-endian): header
`u32 version, str spec_name, u32 revision, u32 n_vars`; per variable `str name, u8 rank,
u32 dims[rank], u8 dtype, u32 nbytes, bytes`; then `u32 n_aliases` and (alias, target)
string pairs. A string is `u16 length` (NUL included) followed by the bytes and the NUL.
No library reads this without CTranslate2 itself, which cannot hand weights to torch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SfcError

__all__ = ["Ct2Model", "read_ct2_model"]

# CT2 dtype codes; bf16 is widened through a uint16 view (numpy has no bfloat16).
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
_BF16 = 5


@dataclass(frozen=True)
class Ct2Model:
    """The variables of a CTranslate2 model, aliases resolved."""

    spec_name: str
    version: int
    revision: int
    variables: dict[str, np.ndarray]

    def scalar(self, name: str) -> int:
        """An integer scalar variable such as `encoder/num_heads`."""
        return int(self.variables[name].reshape(()))


class _Cursor:
    def __init__(self, data: bytes, source: str) -> None:
        self.data = data
        self.pos = 0
        self.source = source

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise SfcError(f"{self.source}: truncated CTranslate2 model (need {n} bytes at "
                           f"offset {self.pos}, file has {len(self.data)})")
        view = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return view

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def string(self) -> str:
        raw = bytes(self.take(self.u16()))
        if not raw.endswith(b"\0"):
            raise SfcError(f"{self.source}: malformed string at offset {self.pos}")
        return raw[:-1].decode("utf-8")


def read_ct2_model(parts: Path | Sequence[Path]) -> Ct2Model:
    """Read a CT2 `model.bin`, given as one path or as split parts to concatenate in order."""
    paths = [Path(parts)] if isinstance(parts, str | Path) else [Path(p) for p in parts]
    for p in paths:
        if not p.is_file():
            raise SfcError(f"checkpoint file not found: {p}")
    data = b"".join(p.read_bytes() for p in paths)
    cur = _Cursor(data, str(paths[0]))
    version = cur.u32()
    if version < 5 or version > 6:
        raise SfcError(f"{paths[0]}: not a CTranslate2 model.bin (format version {version})")
    spec_name = cur.string()
    revision = cur.u32()
    variables: dict[str, np.ndarray] = {}
    for _ in range(cur.u32()):
        name = cur.string()
        dims = [cur.u32() for _ in range(cur.u8())]
        code = cur.u8()
        nbytes = cur.u32()
        if code not in _DTYPES:
            raise SfcError(f"{paths[0]}: variable {name} has unknown dtype code {code}")
        array = np.frombuffer(cur.take(nbytes), dtype=_DTYPES[code]).reshape(dims)
        if code == _BF16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    for _ in range(cur.u32()):
        alias, target = cur.string(), cur.string()
        variables[alias] = variables[target]
    return Ct2Model(spec_name=spec_name, version=version, revision=revision, variables=variables)
