"""The recipe: every quantization decision, as byte-deterministic JSON.

`recipe.json` is the single source of truth `write_qdq` replays. Activation scales are
stored; round-to-nearest weight scales are not, because `method` recomputes them
deterministically from the FP32 weights, whose bytes `model_sha256` pins. Weights made
with calibration data (`gptq`) live in `weights.npz` beside it, pinned by `weight_data`
(`quant.stored`). Version 2 added `weight_data`; version 1 recipes still load.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..atomic import write_text_atomic
from ..errors import SfcError
from ..serial import parse_json, read_text
from .plan import Plan, QuantKind, Skipped
from .spec import QuantSpec
from .stored import STORED_METHODS
from .weights import METHODS, default_method

__all__ = ["Recipe", "TensorRecipe", "model_sha256", "recipe_from_plan"]

_TYPE = "Recipe"
_VERSION = 2
_READS = (1, 2)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def model_sha256(model: onnx.ModelProto) -> str:
    """sha256 of the model's deterministic serialization (what a recipe pins)."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TensorRecipe:
    """How one tensor is quantized, and why.

    `scale`: the activation's per-tensor scale; None for weights, whose scales `method`
    recomputes from the weights. `consumers`: the nodes that read the quantized form
    (for a weight, every reader of the initializer reads it anyway). `stats`: a summary
    of what produced the scale (absmax, chosen threshold, n_values, ...).
    """

    tensor: str
    kind: QuantKind
    spec: QuantSpec
    method: str
    consumers: tuple[str, ...]
    scale: float | None = None
    stats: dict[str, float] = field(default_factory=dict)
    note: str = ""
    gather_spec: QuantSpec | None = None

    def __post_init__(self) -> None:
        name = self.tensor
        if not isinstance(name, str) or not name:
            raise SfcError(f"a tensor recipe needs a tensor name, not {reprlib.repr(name)}")
        if self.kind not in ("weight", "activation"):
            raise SfcError(f"{name!r}: kind must be weight or activation, "
                           f"not {reprlib.repr(self.kind)}")
        if not isinstance(self.method, str) or not self.method:
            raise SfcError(f"{name!r}: scale method must be a name, "
                           f"not {reprlib.repr(self.method)}")
        if not isinstance(self.note, str):
            raise SfcError(f"{name!r}: note must be a string, not {reprlib.repr(self.note)}")
        if not self.consumers or not all(isinstance(c, str) and c for c in self.consumers):
            raise SfcError(f"{name!r}: needs at least one consumer node name")
        if self.kind == "weight":
            if self.scale is not None:
                raise SfcError(f"weight {name!r} stores no scale (its method recomputes it)")
            if self.method not in METHODS and self.method not in STORED_METHODS:
                raise SfcError(f"weight {name!r}: unknown method {reprlib.repr(self.method)}")
        else:
            if self.spec.granularity != "tensor":
                raise SfcError(f"activation {name!r} must be quantized per tensor")
            if not _finite_number(self.scale) or self.scale <= 0:  # type: ignore[operator]
                raise SfcError(f"activation scale for {name!r} is {reprlib.repr(self.scale)}: "
                               "must be finite and > 0")
        if self.gather_spec is not None and (self.kind != "weight" or self.gather_spec.bits != 8):
            raise SfcError(f"{name!r}: a gather_spec is an INT8 spec of a weight")
        bad = [k for k, v in self.stats.items() if not isinstance(k, str) or not _finite_number(v)]
        if bad:
            raise SfcError(f"{name!r}: stats {bad} are not finite numbers")

    def to_dict(self) -> dict[str, Any]:
        """JSON form; `gather_spec` only when set, so other recipes keep their bytes."""
        data: dict[str, Any] = {
            "tensor": self.tensor,
            "kind": self.kind,
            "spec": self.spec.to_dict(),
            "method": self.method,
            "consumers": list(self.consumers),
            "scale": self.scale,
            "stats": dict(self.stats),
            "note": self.note,
        }
        if self.gather_spec is not None:
            data["gather_spec"] = self.gather_spec.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> TensorRecipe:
        keys = {"tensor", "kind", "spec", "method", "consumers", "scale", "stats", "note"}
        if not isinstance(data, dict) or not keys <= set(data) <= keys | {"gather_spec"}:
            shown = sorted(data) if isinstance(data, dict) else data
            raise SfcError(f"malformed tensor recipe: {reprlib.repr(shown)}")
        if not isinstance(data["consumers"], list) or not isinstance(data["stats"], dict):
            raise SfcError(f"malformed tensor recipe {reprlib.repr(data['tensor'])}: "
                           "consumers must be a list and stats an object")
        gather = data.get("gather_spec")
        return cls(
            tensor=data["tensor"],
            kind=data["kind"],
            spec=QuantSpec.from_dict(data["spec"]),
            method=data["method"],
            consumers=tuple(data["consumers"]),
            scale=data["scale"],
            stats=dict(data["stats"]),
            note=data["note"],
            gather_spec=None if gather is None else QuantSpec.from_dict(gather),
        )


@dataclass(frozen=True)
class Recipe:
    """All quantization decisions for one FP32 model.

    `config`: the PlanConfig and calibrator settings that produced it (JSON types).
    `weight_data`: digest of the stored weights (`quant.stored`), None when every weight
    is recomputed by its method.
    """

    model_sha256: str
    seed: int
    config: dict[str, Any]
    tensors: tuple[TensorRecipe, ...]
    skipped: tuple[Skipped, ...] = ()
    weight_data: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_sha256, str) or not _SHA256.fullmatch(self.model_sha256):
            raise SfcError("recipe model_sha256 must be 64 lowercase hex digits")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SfcError(f"recipe seed must be an int, not {reprlib.repr(self.seed)}")
        names = [t.tensor for t in self.tensors]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise SfcError(f"recipe lists tensor '{dup}' twice")
        stored = any(t.method in STORED_METHODS for t in self.tensors)
        if stored != (self.weight_data is not None):
            raise SfcError("recipe weight_data must be given exactly when a weight is stored")
        if self.weight_data is not None and not (
                isinstance(self.weight_data, str) and _SHA256.fullmatch(self.weight_data)):
            raise SfcError("recipe weight_data must be 64 lowercase hex digits")
        try:
            json.dumps(self.config, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise SfcError(f"recipe config is not plain JSON: {exc}") from None

    def get(self, tensor: str) -> TensorRecipe | None:
        """The entry for `tensor`, if any."""
        return next((t for t in self.tensors if t.tensor == tensor), None)

    def to_json(self) -> str:
        """Byte-deterministic JSON: sorted keys, repr floats, indent 2, trailing newline."""
        data = {
            "model_sha256": self.model_sha256,
            "seed": self.seed,
            "config": self.config,
            "tensors": [t.to_dict() for t in self.tensors],
            "skipped": [s.to_dict() for s in self.skipped],
            "weight_data": self.weight_data,
        }
        envelope = {"_type": _TYPE, "_version": _VERSION, "_data": data}
        # json writes floats with float.__repr__ (shortest round-trip form).
        return json.dumps(envelope, indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """Inverse of `to_json`; a foreign or newer document raises SfcError."""
        envelope = parse_json(text, "recipe")
        if not isinstance(envelope, dict) or envelope.get("_type") != _TYPE:
            got = envelope.get("_type") if isinstance(envelope, dict) else None
            raise SfcError(f"not a recipe (_type {reprlib.repr(got)}, expected {_TYPE!r})")
        version = envelope.get("_version")
        if type(version) is not int or version not in _READS:  # not True, 1.0 or a list
            raise SfcError(
                f"recipe version {reprlib.repr(version)} is not supported (this sfc reads "
                f"{', '.join(map(str, _READS))})"
            )
        data = envelope.get("_data")
        keys = {"model_sha256", "seed", "config", "tensors", "skipped"}
        if version == 2:
            keys.add("weight_data")
        if not isinstance(data, dict) or set(data) != keys:
            raise SfcError("malformed recipe: _data must hold " + ", ".join(sorted(keys)))
        if not isinstance(data["config"], dict):
            raise SfcError("malformed recipe: config must be an object")
        if not isinstance(data["tensors"], list) or not isinstance(data["skipped"], list):
            raise SfcError("malformed recipe: tensors and skipped must be lists")
        return cls(
            model_sha256=data["model_sha256"],
            seed=data["seed"],
            config=data["config"],
            tensors=tuple(TensorRecipe.from_dict(t) for t in data["tensors"]),
            skipped=tuple(Skipped.from_dict(s) for s in data["skipped"]),
            weight_data=data.get("weight_data"),
        )

    def save(self, path: str | Path) -> None:
        """Write `to_json()` to `path` atomically."""
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe written by `save`."""
        text = read_text(path, "recipe")
        return cls.from_json(text)


def _plain(value: Any, tensor: str) -> Any:
    """numpy scalars -> Python int / float (JSON types); anything else is left to validation."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if _finite_number(value) or isinstance(value, int | float):
        return value
    raise SfcError(f"activation scale or stat for {tensor!r} is not a number: {value!r}")


def recipe_from_plan(
    plan: Plan,
    activation_scales: Mapping[str, tuple[float, str, Mapping[str, float]]],
    model_sha256: str,
    seed: int,
    config: Mapping[str, Any],
    weight_methods: Mapping[str, str] | None = None,
    weight_data: str | None = None,
) -> Recipe:
    """Turn a plan plus calibrated activation scales into a recipe.

    `activation_scales`: tensor -> (scale, method, stats) for every activation quantizer
    of the plan. `weight_methods`: per-weight overrides of `default_method`; `weight_data`:
    the digest of the stored weights when a method is stored (gptq). A missing,
    NaN, infinite or non-positive activation scale raises SfcError naming the tensor.
    """
    overrides = dict(weight_methods or {})
    unknown = sorted(set(overrides) - {q.tensor for q in plan.weights})
    if unknown:
        raise SfcError(f"weight method given for '{unknown[0]}', which the plan does not quantize")
    tensors = []
    for q in plan.quantizers:
        if q.kind == "weight":
            method = overrides.get(q.tensor, default_method(q.spec))
            tensors.append(
                TensorRecipe(q.tensor, "weight", q.spec, method, q.consumers, note=q.note,
                             gather_spec=q.gather_spec)
            )
            continue
        if q.tensor not in activation_scales:
            raise SfcError(f"no activation scale for '{q.tensor}' (calibrate it first)")
        scale, method, stats = activation_scales[q.tensor]
        entry = TensorRecipe(
            q.tensor, "activation", q.spec, method, q.consumers,
            scale=_plain(scale, q.tensor), stats={k: _plain(v, q.tensor) for k, v in stats.items()},
            note=q.note,
        )  # fmt: skip
        tensors.append(entry)
    return Recipe(model_sha256, seed, dict(config), tuple(tensors), plan.skipped, weight_data)
