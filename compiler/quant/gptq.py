"""GPTQ weight quantization for MatMul weights (numpy, float64 internally, deterministic).

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"; the `fasterquant` loop of AutoGPTQ / llm-compressor) rounds a
weight one input row at a time and pushes each row's rounding error onto the rows not yet
rounded, weighted by how the layer's inputs correlate, so that the *output* error
||X W - X deq(q)||^2 stays small rather than the weight error.

Layout. An ONNX MatMul computes y = x @ W with W [K, N]: K input features (the reduction,
axis 0), N output channels (axis 1). Only the inputs' second moment matters:
H = X^T X / rows ([K, K]), which `GramAccumulator` sums batch by batch during calibration.
The reference implementations hold W transposed ([N, K]) and walk its columns; here W
keeps the ONNX layout and the walk is over its rows, each step vectorised over all N.

Algorithm (per MatMul):
1. H = gram / count; dead inputs (diag 0) get diagonal 1 so H stays invertible, and H is
   dampened by `damp * mean(diag(H))` on the diagonal (retried 10x larger if the Cholesky
   factorisation fails).
2. U = upper Cholesky factor of H^-1. Row r's rounding error e_r = (w_r - deq_r) / U[r, r]
   is compensated by w_j -= U[r, j] * e_r for every later row j: the optimal update of the
   remaining rows (OBS) given that row r is now fixed.
3. Lazy batches: the updates are applied eagerly only inside a batch of `lazy_block` rows;
   later rows receive a whole batch's errors at once as one matrix product (same result up
   to float rounding, far less memory traffic).
4. Scales. Block specs (sub-8-bit, one scale per `block_size` rows of K per column): a
   group's scales are chosen by `weight_scales` on the group's current, error-compensated
   rows when the walk first reaches the group; batches are aligned to groups so that those
   rows have received every earlier row's update. With `act_order` (rows walked by
   decreasing diag(H), the most informative inputs first) groups are static: all scales come
   from the original W up front (llm-compressor's actorder "weight"), and each row is rounded
   with its own group's scale. Per-channel (8-bit) scales also come from W up front.
   Zero-point specs round each group into its own integer window (`integer_bounds`),
   chosen with the group's scale.

The returned q (int8 within the spec's range) and float32 scales are the stored values:
`dequantize_weight(q, spec, scales)` is what the QDQ model's DequantizeLinear computes.
Dead input rows are rounded, never zeroed, since a Gather may read the same weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.linalg import solve_triangular

from ..errors import SfcError
from .spec import QuantSpec
from .weights import METHODS, integer_bounds, round_clip, scale_shape, weight_scales

__all__ = ["TIED", "GptqConfig", "GramAccumulator", "gptq_quantize"]

TIED = ("auto", "gptq", "mse")  # how a tied embedding/logits table rounds (GptqConfig.tied)

_CHOLESKY_RETRIES = 3  # 10x, 100x, 1000x the configured damping before giving up
_GRAM_CHUNK_ELEMENTS = 1 << 22  # bounds GramAccumulator's float64 copy of a batch (32 MB)
_UPDATE_CHUNK_ELEMENTS = 1 << 22  # bounds the lazy batch update's temporary (32 MB)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True)
class GptqConfig:
    """How GPTQ runs.

    `damp`: diagonal dampening as a fraction of mean(diag(H)), in (0, 1].
    `act_order`: walk input rows by decreasing diag(H) (static group scales then).
    `lazy_block`: rows per lazy batch update; affects speed only (and float rounding).
    `scale_method`: how each group's / channel's scale is picked ("mse" or "absmax", see
    `weights.weight_scales`).
    `stages`: groups of a graph's MatMuls calibrated one after another, each on the
    quantized outputs of those before it (`quant.sequential`); 1 = one FP32 pass.
    `tied`: how a weight that Gathers read too (a tied embedding/logits table) is rounded:
    "gptq", "mse" (MSE-clipped scales), or "auto": GPTQ only where it beats MSE rounding on
    held-out calibration inputs (`quant.tied_table`). GPTQ cost whisper-tiny.en 1.2 WER
    points on its table and looked better on whisper-base (BENCHMARKS.md).
    """

    damp: float = 0.01
    act_order: bool = True
    lazy_block: int = 128
    scale_method: str = "mse"
    stages: int = 1
    tied: str = "auto"

    def __post_init__(self) -> None:
        damp = self.damp
        if (isinstance(damp, bool) or not isinstance(damp, int | float | np.floating)
                or not math.isfinite(damp) or not 0 < damp <= 1):
            raise SfcError(f"GPTQ damp must be a number in (0, 1], not {damp!r}")
        if not isinstance(self.act_order, bool):
            raise SfcError(f"GPTQ act_order must be true or false, not {self.act_order!r}")
        if not _is_int(self.lazy_block) or self.lazy_block < 1:
            raise SfcError(f"GPTQ lazy_block must be a positive int, not {self.lazy_block!r}")
        if self.scale_method not in METHODS:
            raise SfcError(f"GPTQ scale_method must be one of {', '.join(METHODS)}, "
                           f"not {self.scale_method!r}")
        if not _is_int(self.stages) or self.stages < 1:
            raise SfcError(f"GPTQ stages must be a positive int, not {self.stages!r}")
        if self.tied not in TIED:
            raise SfcError(f"GPTQ tied must be one of {', '.join(TIED)}, not {self.tied!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as recipe.json stores it (`stages` only when not 1, `tied` only when
        not "mse", so recipes made before they existed stay byte-identical)."""
        out: dict[str, Any] = {
            "damp": float(self.damp),
            "act_order": self.act_order,
            "lazy_block": int(self.lazy_block),
            "scale_method": self.scale_method,
        }
        if self.stages != 1:
            out["stages"] = int(self.stages)
        if self.tied != "mse":
            out["tied"] = self.tied
        return out

    @classmethod
    def from_dict(cls, data: Any) -> GptqConfig:
        """Inverse of `to_dict`; malformed input raises SfcError."""
        keys = {"damp", "act_order", "lazy_block", "scale_method"}
        if not isinstance(data, dict) or not keys <= set(data) <= keys | {"stages", "tied"}:
            raise SfcError(f"malformed GPTQ config: {data!r}")
        tied = data.get("tied", "mse")
        if isinstance(tied, bool):  # recipes of 2026-12-04 stored true (GPTQ) only
            tied = "gptq" if tied else "mse"
        return cls(data["damp"], data["act_order"], data["lazy_block"], data["scale_method"],
                   data.get("stages", 1), tied)


class GramAccumulator:
    """Running X^T X (float64, [K, K]) and row count for one MatMul input, updated batch by
    batch (bounded memory: never stores activations)."""

    def __init__(self, k: int) -> None:
        if not _is_int(k) or k < 1:
            raise SfcError(f"a Gram accumulator needs a positive feature count, not {k!r}")
        self._k = int(k)
        self._gram: np.ndarray | Path = np.zeros((self._k, self._k), dtype=np.float64)
        self._count = 0

    def update(self, x: np.ndarray) -> None:
        """Add the rows of `x` [..., K] (leading dims flattened); NaN/Inf raise SfcError."""
        if isinstance(self._gram, Path):
            raise SfcError("internal: a spilled Gram accumulator takes no more rows")
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self._k:
            raise SfcError(f"Gram accumulator expects inputs [..., {self._k}], got {x.shape}")
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise SfcError(f"Gram accumulator expects real numbers, got {x.dtype}")
        rows = x.reshape(-1, self._k)
        if not np.isfinite(rows).all():
            raise SfcError("calibration activations have NaN or Inf values")
        # Chunks bound the float64 copy; the sum is the same up to float rounding.
        step = max(1, _GRAM_CHUNK_ELEMENTS // self._k)
        for start in range(0, rows.shape[0], step):
            part = rows[start:start + step].astype(np.float64)
            self._gram += part.T @ part
        self._count += rows.shape[0]

    @property
    def gram(self) -> np.ndarray:
        """X^T X so far (a read-only view of the running sum, or read back once spilled)."""
        view = np.load(self._gram) if isinstance(self._gram, Path) else self._gram.view()
        view.flags.writeable = False
        return view

    def spill(self, path: Path) -> None:
        """Keep the finished sum in the file `path` (.npy) instead of in memory: `gram`
        reads it back at each use (one GPTQ or proxy at a time), and `update` refuses. A
        mixed build otherwise holds every MatMul input's K x K float64 sum through its
        sensitivity probes (BENCHMARKS.md, issue 16)."""
        if isinstance(self._gram, Path):
            return
        np.save(path, self._gram)
        self._gram = path

    @property
    def count(self) -> int:
        """Rows added so far."""
        return self._count


def _check_inputs(w: np.ndarray, gram: np.ndarray, count: int, spec: QuantSpec,
                  config: GptqConfig) -> None:
    if not isinstance(w, np.ndarray) or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        what = f"{w.dtype} {w.shape}" if isinstance(w, np.ndarray) else type(w).__name__
        raise SfcError(f"GPTQ needs a 2-D float MatMul weight [K, N], got {what}")
    if w.size == 0 or not np.isfinite(w).all():
        raise SfcError(f"GPTQ needs a non-empty finite weight, got shape {w.shape}")
    k = w.shape[0]
    gram = np.asarray(gram)
    if (gram.shape != (k, k) or not np.issubdtype(gram.dtype, np.number)
            or np.iscomplexobj(gram)):
        raise SfcError(f"GPTQ gram must be a [{k}, {k}] matrix for weight {w.shape}, "
                       f"got {gram.dtype} {gram.shape}")
    if not np.isfinite(gram).all():
        raise SfcError("GPTQ gram has NaN or Inf values")
    if (np.diagonal(gram) < 0).any():
        raise SfcError("GPTQ gram has a negative diagonal (not an X^T X)")
    if not _is_int(count) or count < 1:
        raise SfcError(f"GPTQ needs a positive calibration row count, not {count!r}")
    if not isinstance(spec, QuantSpec):
        raise SfcError(f"GPTQ needs a QuantSpec, not {type(spec).__name__}")
    if spec.pair_limit is not None:
        raise SfcError(f"GPTQ does not handle pair limits ({spec.describe()})")
    layout_ok = ((spec.granularity == "block" and spec.axis == 0)
                 or (spec.granularity == "channel" and spec.axis == 1))
    if not layout_ok:
        raise SfcError(f"GPTQ handles block(axis 0) or per-channel(axis 1) MatMul weights, "
                       f"not {spec.describe()}")
    if not isinstance(config, GptqConfig):
        raise SfcError(f"GPTQ needs a GptqConfig, not {type(config).__name__}")


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (h + damp * mean(diag h) * I)^-1 (U^T U = H^-1), retrying
    with 10x the damping when a factorisation fails (H only positive semi-definite, or
    rounding made it slightly indefinite)."""
    k = h.shape[0]
    base = float(np.mean(np.diagonal(h)))
    eye = np.eye(k)
    for attempt in range(_CHOLESKY_RETRIES + 1):
        damped = h + (damp * 10.0**attempt * base) * eye
        try:
            lower = np.linalg.cholesky(damped)
            # H^-1 from H's factor: two triangular solves rather than a general inverse.
            inv_lower = solve_triangular(lower, eye, lower=True)
            h_inv = inv_lower.T @ inv_lower
            upper = np.linalg.cholesky(h_inv).T
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(upper).all() and (np.diagonal(upper) > 0).all():
            return np.ascontiguousarray(upper)
    raise SfcError(f"GPTQ: the Hessian is not positive definite even with "
                   f"{damp * 10.0**_CHOLESKY_RETRIES:g} x mean(diag) dampening")


def gptq_quantize(w: np.ndarray, gram: np.ndarray, count: int, spec: QuantSpec,
                  config: GptqConfig = GptqConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Return (q int8 [K, N] within spec's range, scales float32 of shape
    scale_shape(w.shape, spec)) minimising ||X (W - deq(q))||^2 approximately by GPTQ's
    row-wise rounding with error compensation via the Cholesky factor of the inverse damped
    Hessian H = gram / count (see the module docstring)."""
    _check_inputs(w, gram, count, spec, config)
    k, n = w.shape
    method = config.scale_method
    block = spec.granularity == "block"
    g = spec.block_size if block else None

    h = np.asarray(gram, dtype=np.float64) / count
    h = (h + h.T) / 2  # X^T X from a BLAS product can be asymmetric in the last bits
    diag = np.diagonal(h).copy()
    dead = np.flatnonzero(diag == 0)
    # A dead input never contributes to the output: diagonal 1 keeps H invertible and, with
    # its row and column zero, decouples the row from the rest (it is simply rounded).
    h[dead, dead] = 1.0

    # Row order of the walk; static (up-front) scales unless groups follow the walk.
    perm = np.argsort(-np.diagonal(h), kind="stable") if config.act_order else np.arange(k)
    # 8-bit scale codes share a step per column, so a column's scales are fixed together.
    static = not block or config.act_order or spec.scale_bits == 8
    if static:
        scales = weight_scales(w, spec, method)
        lows, highs = integer_bounds(w, spec, scales)
    else:
        scales = np.empty(scale_shape(w.shape, spec), dtype=np.float32)
        lows, highs = np.empty_like(scales), np.empty_like(scales)
    # The scale row each walked row uses (channel specs: the one [N] vector); views.
    scale_row = perm // g if g is not None else np.zeros(k, dtype=np.intp)
    scales_2d, lows_2d, highs_2d = ((a if block else a.reshape(1, n))
                                    for a in (scales, lows, highs))

    u = _inverse_cholesky(h[np.ix_(perm, perm)], config.damp)
    work = np.asarray(w, dtype=np.float64)[perm]  # a copy, updated in place
    q_walk = np.empty((k, n), dtype=np.int8)

    step = config.lazy_block
    if g is not None and not static:
        # Batches made of whole groups: when the walk reaches a group, all its rows lie in
        # the current batch and carry every earlier row's update, so its scales see the
        # compensated weights whatever lazy_block is.
        step = max(g, step // g * g)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        batch = work[i1:i2]  # a view: eager updates inside the batch land in `work`
        errs = np.empty((i2 - i1, n), dtype=np.float64)
        for i in range(i2 - i1):
            r = i1 + i
            if g is not None and not static and r % g == 0:
                group = batch[i:i + g]
                scales_2d[r // g] = weight_scales(group, spec, method)[0]
                bounds = integer_bounds(group, spec, scales_2d[r // g:r // g + 1])
                lows_2d[r // g], highs_2d[r // g] = bounds[0][0], bounds[1][0]
            c = scale_row[r]
            s = scales_2d[c]
            row = batch[i]
            # float32 quotient and product, as quantize_weight and DequantizeLinear compute.
            q_row = round_clip(row.astype(np.float32) / s, lows_2d[c], highs_2d[c])
            deq = (q_row.astype(np.float32) * s).astype(np.float64)
            q_walk[r] = q_row.astype(np.int8)
            err = (row - deq) / u[r, r]
            if i + 1 < i2 - i1:
                batch[i + 1:] -= np.outer(u[r, r + 1:i2], err)
            errs[i] = err
        if i2 < k:
            # Column chunks keep the product's temporary small next to `work` itself.
            coupling = np.ascontiguousarray(u[i1:i2, i2:].T)
            cols = max(1, _UPDATE_CHUNK_ELEMENTS // (k - i2))
            for c in range(0, n, cols):
                work[i2:, c:c + cols] -= coupling @ errs[:, c:c + cols]

    q = np.empty_like(q_walk)
    q[perm] = q_walk
    return q, scales
