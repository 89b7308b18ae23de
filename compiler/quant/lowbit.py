"""One entry point for how a weight's integers are chosen: `--weight-method rtn|mse|gptq`.

- rtn: absmax scales, round to nearest (recomputed from the FP32 weight at write time).
- mse: per-block clip ratio with the least squared error, round to nearest (recomputed).
- gptq: second-order rounding with error compensation from the layer's input Gram
  matrix (`quant.gptq`); its integers and scales are stored (`quant.stored`).
The method applies to sub-8-bit weights; INT8 per-channel weights are always absmax
(their rounding error is already small), and a weight without a Gram matrix (Conv, Gemm)
falls back to mse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import SfcError
from .gptq import GptqConfig, gptq_quantize
from .spec import QuantSpec
from .weights import default_method, round_to_nearest

__all__ = ["WEIGHT_METHODS", "quantize_layer", "recipe_method"]

WEIGHT_METHODS = ("rtn", "mse", "gptq")


def recipe_method(method: str, spec: QuantSpec, has_gram: bool) -> str:
    """The recipe's method name for a weight of `spec` under the user's `method`."""
    if method not in WEIGHT_METHODS:
        raise SfcError(f"unknown weight method {method!r} (choose from "
                       f"{', '.join(WEIGHT_METHODS)})")
    if spec.bits == 8:
        return default_method(spec)
    if method == "gptq":
        return "gptq" if has_gram and spec.granularity == "block" and spec.axis == 0 else "mse"
    return {"rtn": "absmax", "mse": "mse"}[method]


def quantize_layer(w: np.ndarray, spec: QuantSpec, method: str,
                   gram: Any | None = None, gptq: GptqConfig | None = None
                   ) -> tuple[np.ndarray, np.ndarray, str]:
    """(int8 integers, scales, recipe method) of weight `w` under `spec`.

    `gram`: the layer input's `GramAccumulator` (GPTQ needs it).
    """
    name = recipe_method(method, spec, gram is not None)
    if name == "gptq":
        assert gram is not None
        q, scales = gptq_quantize(np.asarray(w, np.float32), gram.gram, gram.count, spec,
                                  gptq or GptqConfig())
        return q, scales, name
    return (*round_to_nearest(w, spec, name), name)


def stored_only(quantized: Mapping[str, tuple[np.ndarray, np.ndarray, str]]
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The entries of `quantized` whose integers must be stored (gptq)."""
    return {t: (q, s) for t, (q, s, m) in quantized.items() if m == "gptq"}
