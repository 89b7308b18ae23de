"""Hadamard rotations before low-bit weights (QuaRot / QuIP-style incoherence).

A MatMul x W computes the same as (x R)(R^T W) for an orthogonal R. Rounding R^T W
instead of W spreads a few large input channels over whole blocks, so 2- and 4-bit block
scales fit better. R = D H: random signs D (one per input channel, seeded) times a
block-diagonal Hadamard of 32 x 32 blocks (a quantization block of 32 or more holds
whole Hadamard blocks). In the graph, x R is a `Mul` by the signs and one shared 32 x 32
`MatMul` on x reshaped to rows of 32, in float (the float32 signs added 0.26 MB to
whisper-base's 70.3 MB 4.0-bit build with both graphs rotated); the weights become R^T W
in FP32, before calibration, so GPTQ's Gram matrices, the mixed search's probes and the
recipe all see the rotated model. Measured on whisper-base's
4.0-bit map (BENCHMARKS.md, issue 10); on tiny.en it did not help, so it is opt-in.

`Rotation` holds the seed and the rotated inputs; the signs follow from the seed, so a
replay re-creates the rotation from the recipe and checks it by its digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import scipy.linalg
from onnx import helper, numpy_helper

from ..errors import SfcError
from ..onnx_utils import node_readers, with_weights

__all__ = ["HADAMARD", "PREFIX", "Rotation", "make_rotation", "rotation_sites"]

HADAMARD = 32
PREFIX = "sfc_rotate/"  # names of the nodes and constants a rotation adds
_H = PREFIX + "hadamard"
_ROWS = PREFIX + "rows"


def rotation_sites(model: onnx.ModelProto) -> dict[str, tuple[str, ...]]:
    """Inputs that can be rotated -> the weights reading them: the first inputs of MatMuls
    whose weight is a 2-D float32 initializer of K rows (a multiple of 32) that no other
    node reads; other readers of the input go on reading it unrotated. A tied table (also
    gathered) is left alone: its Gather would need the rotation undone."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = node_readers(graph)
    found: dict[str, list[str]] = {}
    for n in graph.node:
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        x, w = n.input
        t = inits.get(w)
        if (x in inits or x.startswith(PREFIX) or t is None or len(t.dims) != 2
                or t.data_type != onnx.TensorProto.FLOAT or t.dims[0] % HADAMARD
                or len(readers[w]) != 1):
            continue
        found.setdefault(x, []).append(w)
    return {x: tuple(found[x]) for x in sorted(found)}


def _hadamard() -> np.ndarray:
    return scipy.linalg.hadamard(HADAMARD) / np.sqrt(HADAMARD)  # symmetric, orthogonal


def _rotate_rows(w: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """R^T W for R = diag(signs) blockdiag(H): each 32-row block b becomes H (s_b * W_b)."""
    k, n = w.shape
    blocks = (np.asarray(signs, np.float64)[:, None] * np.asarray(w, np.float64)).reshape(
        k // HADAMARD, HADAMARD, n)
    return np.einsum("ij,bjn->bin", _hadamard(), blocks).reshape(k, n)


@dataclass(frozen=True)
class Rotation:
    """One graph's rotation: `seed` and its sites (input tensor -> +-1 signs, float32)."""

    seed: int
    signs: dict[str, np.ndarray]

    def digest(self) -> str:
        """sha256 over the block size, names and signs in name order."""
        h = hashlib.sha256(f"hadamard {HADAMARD}".encode())
        for name in sorted(self.signs):
            h.update(b"\0" + name.encode() + b"\0" + np.ascontiguousarray(
                self.signs[name], np.float32).tobytes())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "block": HADAMARD, "inputs": sorted(self.signs),
                "digest": self.digest()}

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` whose rotated inputs are read as x R by their MatMuls and whose
        weights hold R^T W (the caller's model is untouched)."""
        sites = rotation_sites(model)
        missing = sorted(set(self.signs) - set(sites))
        if missing:
            raise SfcError(f"the rotation names input '{missing[0]}', which this model "
                           "cannot rotate")
        inits = {t.name: t for t in model.graph.initializer}
        arrays: dict[str, np.ndarray] = {}
        for x in self.signs:
            for w in sites[x]:
                a = numpy_helper.to_array(inits[w])
                if a.shape[0] != self.signs[x].size:
                    raise SfcError(f"the rotation of '{x}' has {self.signs[x].size} signs "
                                   f"for weight '{w}' of {a.shape[0]} rows")
                arrays[w] = _rotate_rows(a, self.signs[x]).astype(np.float32)
        out = with_weights(model, arrays)
        graph = out.graph
        graph.initializer.extend([
            numpy_helper.from_array(_hadamard().astype(np.float32), _H),
            numpy_helper.from_array(np.array([-1, HADAMARD], np.int64), _ROWS)])
        # By position: node names may be empty or repeated in a model not yet planned.
        before: dict[int, list[onnx.NodeProto]] = {}
        for i, x in enumerate(sorted(self.signs)):
            p = f"{PREFIX}{i}/"
            graph.initializer.append(numpy_helper.from_array(
                np.asarray(self.signs[x], np.float32), p + "signs"))
            nodes = [
                helper.make_node("Mul", [x, p + "signs"], [p + "signed"], name=p + "Mul"),
                helper.make_node("Reshape", [p + "signed", _ROWS], [p + "rows"],
                                 name=p + "Reshape"),
                helper.make_node("MatMul", [p + "rows", _H], [p + "mixed"], name=p + "MatMul"),
                helper.make_node("Shape", [x], [p + "shape"], name=p + "Shape"),
                helper.make_node("Reshape", [p + "mixed", p + "shape"], [p + "x"],
                                 name=p + "Reshape_back"),
            ]
            readers = [i for i, n in enumerate(graph.node) if n.op_type == "MatMul"
                       and n.input[0] == x and n.input[1] in sites[x]]
            before[readers[0]] = nodes
            for i in readers:
                graph.node[i].input[0] = p + "x"
        ordered: list[onnx.NodeProto] = []
        for i, n in enumerate(graph.node):
            ordered += before.get(i, [])
            ordered.append(n)
        del graph.node[:]
        graph.node.extend(ordered)
        return out

    @classmethod
    def from_dict(cls, data: Any, model: onnx.ModelProto) -> Rotation:
        """The recipe's rotation re-created on `model` (the unrotated FP32 model) and
        checked against the recorded digest."""
        if not isinstance(data, dict) or not isinstance(data.get("seed"), int) \
                or data.get("block") != HADAMARD or not isinstance(data.get("digest"), str):
            raise SfcError(f"malformed rotation entry in the recipe: {data!r}")
        rotation = make_rotation(model, data["seed"])
        if rotation.digest() != data["digest"]:
            raise SfcError(f"the recipe's rotation (digest {data['digest'][:12]}) does not "
                           f"match this model's (digest {rotation.digest()[:12]})")
        return rotation


def make_rotation(model: onnx.ModelProto, seed: int) -> Rotation:
    """Signs for every rotatable input of `model`, drawn from one generator seeded with
    `seed`, inputs in name order (`benchmarks/hadamard_rotation.py` drew them so)."""
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    signs = {x: rng.choice([-1.0, 1.0], int(inits[ws[0]].dims[0])).astype(np.float32)
             for x, ws in rotation_sites(model).items()}
    if not signs:
        raise SfcError("--rotate: this graph has no MatMul input to rotate (constant 2-D "
                       "weights of a multiple of 32 rows, read by nothing else)")
    return Rotation(seed, signs)
