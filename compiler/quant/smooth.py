"""Activation smoothing (SmoothQuant, Xiao et al. 2023): move a quantized MatMul input's
per-channel range into the MatMul's weights, exactly in FP32, before calibration.

Per-tensor activation scales spend their 8 bits on the few channels with the largest
values; whisper-base's fc2 inputs reach 1000x their median channel's range. For an input x
read only by MatMuls with constant weights W, each channel j is divided by

    s_j = max|x_j|^alpha / max|W_j,:|^(1 - alpha)

(max|x_j| over calibration clips, max|W_j,:| over every MatMul reading x) and W's row j is
multiplied by it. The division is folded into the op that makes x, which must be linear
per channel: a LayerNormalization (gamma / s, beta / s) or a Mul by a constant (Whisper's
GELU ends in a Mul by 0.5, which becomes the vector 0.5 / s). Nothing is added to the graph
(the ort-cpu lowering splits that Mul again, so that ORT fuses the GELU: `GeluChannelScale`).

The smoothed FP32 model computes what the original does (up to float rounding) and is the
model the build quantizes and calibrates against; `Smoothing` holds the vectors, saved as
`smoothing.npz` beside the recipe and pinned by its digest, so a replay smooths the source
the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import SfcError
from ..onnx_utils import node_readers, with_weights
from .stored import load_named, save_named

__all__ = ["SMOOTHING_FILE", "ChannelAbsMax", "Site", "SmoothConfig", "Smoothing",
           "smooth_sites", "smoothing_scales"]

SMOOTHING_FILE = "smoothing.npz"
FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class SmoothConfig:
    """`alpha`: how much of the range moves into the weights (0.5: SmoothQuant's default;
    whisper-base's all-quantized KL 0.1045 -> 0.0241 on one seed, BENCHMARKS.md). `clips`:
    the first calibration clips the channel ranges are taken on."""

    alpha: float = 0.5
    clips: int = 32

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0 <= a <= 1:
            raise SfcError(f"--smooth-alpha must be a number in [0, 1], not {a!r}")
        if isinstance(self.clips, bool) or not isinstance(self.clips, int) or self.clips < 1:
            raise SfcError(f"--smooth-clips must be an integer >= 1, not {self.clips!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "clips": self.clips}


@dataclass(frozen=True)
class Site:
    """One smoothable input: `tensor`, the node that makes it, the weights reading it."""

    tensor: str
    producer: str
    weights: tuple[str, ...]


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Constant tensors by name: initializers and `Constant` nodes' `value`s."""
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            out[n.output[0]] = n.attribute[0].t
    return out


def smooth_sites(model: onnx.ModelProto, tensors: Collection[str]) -> dict[str, Site]:
    """The inputs among `tensors` (the plan's quantized activations) that can be smoothed:
    read only by MatMuls (as their first input, each with a 2-D float32 initializer weight
    no other node reads) and by Shape, made by a LayerNormalization whose float32 gamma/beta
    nothing else reads or by a Mul of a float32 scalar constant nothing else reads."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = _constants(model)
    readers = node_readers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    found = {}
    for x in sorted(tensors):
        p = producers.get(x)
        if p is None or x in outputs:
            continue
        mms = [n for n in readers.get(x, []) if n.op_type != "Shape"]  # Shape sees no values
        if not mms or not all(n.op_type == "MatMul" and n.input[0] == x and n.input[1] in inits
                              and len(inits[n.input[1]].dims) == 2
                              and inits[n.input[1]].data_type == FLOAT for n in mms):
            continue
        weights = tuple(n.input[1] for n in mms)
        if any(len(readers[w]) > 1 for w in weights):
            continue
        if p.op_type == "LayerNormalization":
            params = [t for t in p.input[1:] if t]
            if not all(t in inits and len(readers[t]) == 1 and inits[t].data_type == FLOAT
                       for t in params):
                continue
        elif p.op_type == "Mul":
            c = p.input[1]
            # A scalar only: a per-channel constant would need its axis checked.
            if (c not in consts or len(readers[c]) != 1 or consts[c].data_type != FLOAT
                    or numpy_helper.to_array(consts[c]).size != 1):
                continue
        else:
            continue
        found[x] = Site(x, p.name, weights)
    return found


class ChannelAbsMax:
    """max |x| per last-axis channel over every value `update` sees (a `collect_stats`
    accumulator, like GPTQ's Gram sums)."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
        self.value = m if self.value is None else np.maximum(self.value, m)

    def result(self) -> np.ndarray:
        if self.value is None:
            raise SfcError("smoothing saw no calibration values")
        return self.value


def smoothing_scales(xmax: np.ndarray, weights: Iterable[np.ndarray],
                     alpha: float) -> np.ndarray:
    """SmoothQuant's s = max|x|^alpha / max|W_row|^(1 - alpha), float64 (zeros clamped;
    `xmax`'s power is taken in its own float32, as `benchmarks/smooth_fold.py` measured)."""
    wmax = np.max([np.abs(np.asarray(w, np.float64)).max(axis=1) for w in weights], axis=0)
    x = np.maximum(np.asarray(xmax, np.float32), np.float32(1e-5)) ** np.float32(alpha)
    s = x / np.maximum(wmax, 1e-5) ** (1 - alpha)
    return np.maximum(s, 1e-5)


@dataclass(frozen=True)
class Smoothing:
    """One graph's smoothing: site tensor -> its vector s (float64: the fold divides and
    multiplies in float64 and rounds once to the model's float32)."""

    scales: Mapping[str, np.ndarray]

    def digest(self) -> str:
        """sha256 over names, shapes and bytes in name order."""
        h = hashlib.sha256()
        for name in sorted(self.scales):
            a = np.ascontiguousarray(self.scales[name], np.float64)
            h.update(name.encode() + b"\0" + f"{a.shape}".encode() + a.tobytes())
        return h.hexdigest()

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` with every site's 1/s folded into its producer and s into the
        rows of the weights reading it (the caller's model is untouched)."""
        sites = smooth_sites(model, self.scales)
        missing = sorted(set(self.scales) - set(sites))
        if missing:
            raise SfcError(f"smoothing names '{missing[0]}', which this model cannot smooth")
        inits = {t.name for t in model.graph.initializer}
        consts = _constants(model)
        # By the tensor it makes: node names may be empty or repeated.
        producers = {o: n for n in model.graph.node for o in n.output}
        arrays: dict[str, np.ndarray] = {}  # new weight values
        # New values written in place afterwards: `Constant` nodes, and scalars that become
        # one value per channel (a few bytes each).
        small: dict[str, np.ndarray] = {}
        for x, site in sites.items():
            s = np.asarray(self.scales[x], np.float64)
            w = [numpy_helper.to_array(consts[k]).astype(np.float64) for k in site.weights]
            if any(v.shape[0] != s.shape[0] for v in w) or s.ndim != 1:
                raise SfcError(f"smoothing of '{x}' has {s.shape} values for weights of "
                               f"{w[0].shape[0]} rows")
            p = producers[x]
            folded = [t for t in p.input[1:] if t] if p.op_type == "LayerNormalization" \
                else [p.input[1]]
            for t in folded:
                old = numpy_helper.to_array(consts[t])
                value = (old / s).astype(np.float32)
                (arrays if t in inits and value.shape == old.shape else small)[t] = value
            for k, v in zip(site.weights, w, strict=True):
                arrays[k] = (v * s[:, None]).astype(np.float32)
        out = with_weights(model, arrays)
        for t, tensor in _constants(out).items():
            if t in small:
                tensor.CopyFrom(numpy_helper.from_array(small[t], t))
        return out

    def save(self, path: Path) -> None:
        save_named(path, {n: (np.asarray(v, np.float64),) for n, v in self.scales.items()},
                   "s")

    @classmethod
    def load(cls, path: Path, digest: str) -> Smoothing:
        """Read `path` and check it against the recipe's `digest`."""
        smoothing = cls({n: v for n, (v,) in load_named(path, "s", "smoothing", "it").items()})
        if smoothing.digest() != digest:
            raise SfcError(f"{path} does not match its recipe (digest "
                           f"{smoothing.digest()[:12]}, recipe {digest[:12]})")
        return smoothing
