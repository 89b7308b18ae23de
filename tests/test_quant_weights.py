"""Weight scales (absmax, MSE search) and round-to-nearest quantization."""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, numpy_helper

from sfc.errors import SfcError
from sfc.quant import (
    QuantSpec,
    broadcast_scales,
    default_method,
    dequantize_weight,
    quantize_weight,
    scale_shape,
    weight_scales,
)
from sfc.quant.weights import limit_pairs, pairs_over

SPECS = [
    QuantSpec(8, "tensor"),
    QuantSpec(8, "channel", axis=1),
    QuantSpec(8, "channel", axis=0),
    QuantSpec(4, "block", axis=0, block_size=32),
    QuantSpec(4, "block", axis=1, block_size=16),
    QuantSpec(2, "block", axis=0, block_size=16),
    QuantSpec(4, "channel", axis=1),
]


def _outlier_weights(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Gaussian weights with a few large outliers (what makes absmax scales coarse)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    mask = rng.random(shape) < 0.01
    w[mask] *= 12.0
    return w


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_absmax_round_trip_error_is_at_most_half_a_step(spec: QuantSpec) -> None:
    w = _outlier_weights((72, 40))  # 72 is not a multiple of the block sizes
    scales = weight_scales(w, spec, "absmax")
    assert scales.dtype == np.float32 and scales.shape == scale_shape(w.shape, spec)
    assert (scales > 0).all()
    q = quantize_weight(w, spec, scales)
    assert q.dtype == np.int8
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    err = np.abs(dequantize_weight(q, spec, scales) - w)
    step = broadcast_scales(scales, spec, w.shape)
    assert (err <= step / 2 * (1 + 1e-6)).all()


def test_block_scale_layout_matches_onnx_dq() -> None:
    w = np.arange(70 * 6, dtype=np.float32).reshape(70, 6) - 200
    spec = QuantSpec(4, "block", axis=0, block_size=32)
    scales = weight_scales(w, spec, "absmax")
    assert scales.shape == (3, 6)  # ceil(70 / 32) blocks of K, per column N
    for b in range(3):
        for n in range(6):
            block = w[b * 32 : (b + 1) * 32, n]
            assert scales[b, n] == np.float32(np.abs(block).max() / 7)


@pytest.mark.parametrize("bits", [4, 2])
def test_mse_beats_absmax_on_weights_with_outliers(bits: int) -> None:
    w = _outlier_weights((256, 96), seed=bits)
    spec = QuantSpec(bits, "block", axis=0, block_size=32)
    errors = {}
    for method in ("absmax", "mse"):
        scales = weight_scales(w, spec, method)
        deq = dequantize_weight(quantize_weight(w, spec, scales), spec, scales)
        errors[method] = float(((deq - w) ** 2).sum())
    assert errors["mse"] < 0.95 * errors["absmax"], errors


def test_mse_never_worse_per_group_and_is_deterministic() -> None:
    w = _outlier_weights((64, 48), seed=3)
    spec = QuantSpec(4, "channel", axis=1)
    absmax, mse = weight_scales(w, spec, "absmax"), weight_scales(w, spec, "mse")
    assert np.array_equal(mse, weight_scales(w.copy(), spec, "mse"))

    def col_err(scales: np.ndarray) -> np.ndarray:
        deq = dequantize_weight(quantize_weight(w, spec, scales), spec, scales)
        return ((deq - w) ** 2).sum(axis=0)

    assert (col_err(mse) <= col_err(absmax) + 1e-12).all()
    assert (mse <= absmax).all() and (mse >= 0.5 * absmax * (1 - 1e-6)).all()


def test_default_methods() -> None:
    assert default_method(QuantSpec(8, "channel", axis=0)) == "absmax"
    assert default_method(QuantSpec(4, "block", axis=0, block_size=32)) == "mse"
    assert default_method(QuantSpec(2, "block", axis=0, block_size=32)) == "mse"


def test_round_half_to_even_and_clipping() -> None:
    spec = QuantSpec(4, "tensor")
    scales = np.array(1.0, dtype=np.float32)
    w = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 6.5, 7.6, -8.4, 100.0, -100.0], np.float32)
    assert quantize_weight(w, spec, scales).tolist() == [0, 2, 2, 0, -2, 6, 7, -8, 7, -8]


def test_zero_weights_get_positive_scales() -> None:
    w = np.zeros((32, 4), np.float32)
    w[:, 1] = 0.5
    spec = QuantSpec(8, "channel", axis=1)
    for method in ("absmax", "mse"):
        scales = weight_scales(w, spec, method)
        assert (scales > 0).all()
        q = quantize_weight(w, spec, scales)
        assert np.array_equal(dequantize_weight(q, spec, scales), w)


DEQUANTIZED = [(spec, shape) for shape in [(72, 40), (5, 40, 3)]
               for spec in [*SPECS, QuantSpec(4, "block", axis=2, block_size=16),
                            QuantSpec(4, "block", axis=1, block_size=32, zero_point=True)]
               if spec.axis is None or spec.axis < len(shape)]


@pytest.mark.parametrize(("spec", "shape"), DEQUANTIZED,
                         ids=[f"{s.describe()}-{'x'.join(map(str, d))}" for s, d in DEQUANTIZED])
def test_dequantize_is_the_product_with_expanded_scales_bit_for_bit(
        spec: QuantSpec, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    q = rng.integers(spec.qmin, spec.qmax + 1, size=shape, dtype=np.int8)
    scales = (rng.random(scale_shape(shape, spec)) * 3).astype(np.float32)
    expected = q.astype(np.float32) * broadcast_scales(scales, spec, shape)
    got = dequantize_weight(q, spec, scales)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    with pytest.raises(SfcError, match="expected"):
        dequantize_weight(q, spec, np.ones(7, np.float32))


def test_dequantize_allocates_only_its_result() -> None:
    # The probes dequantize a table per probe: expanded scales and a copied product made
    # the peak 3x the result.
    spec = QuantSpec(4, "block", axis=0, block_size=32)
    q = np.ones((384, 2000), np.int8)
    scales = np.ones(scale_shape(q.shape, spec), np.float32)
    tracemalloc.start()
    try:
        out = dequantize_weight(q, spec, scales)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < out.nbytes * 1.05


def test_bad_inputs_raise_user_errors() -> None:
    spec = QuantSpec(8, "channel", axis=1)
    w = np.ones((4, 4), np.float32)
    w[0, 0] = np.nan
    with pytest.raises(SfcError, match="NaN or Inf"):
        weight_scales(w, spec)
    with pytest.raises(SfcError, match="unknown weight scale method"):
        weight_scales(np.ones((4, 4), np.float32), spec, "percentile")
    with pytest.raises(SfcError, match="out of range"):
        weight_scales(np.ones(4, np.float32), spec)
    with pytest.raises(SfcError, match="expected"):
        quantize_weight(np.ones((4, 4), np.float32), spec, np.ones(3, np.float32))


def test_onnx_packs_int4_and_int2_as_the_spec_says() -> None:
    """onnx 1.23's own helpers pack sub-byte types; the writer relies on them."""
    int4 = numpy_helper.from_array(np.array([1, -2, 3, -8, 7], np.int8).astype(ml_dtypes.int4))
    assert int4.data_type == TensorProto.INT4
    assert int4.raw_data == bytes([0xE1, 0x83, 0x07])  # low nibble first
    int2 = numpy_helper.from_array(np.array([1, -2, 0, -1, 1], np.int8).astype(ml_dtypes.int2))
    assert int2.data_type == TensorProto.INT2
    assert int2.raw_data == bytes([0b11_00_10_01, 0b01])  # x0 | x1<<2 | x2<<4 | x3<<6
    assert numpy_helper.to_array(int2).astype(np.int8).tolist() == [1, -2, 0, -1, 1]


def test_limit_pairs_bounds_every_k_pair_with_the_least_change() -> None:
    rng = np.random.default_rng(5)
    q = rng.integers(-128, 128, size=(33, 8)).astype(np.int8)  # MatMul [K, N], odd K
    q[:2, 0] = [127, 127]
    q[2:4, 0] = [-128, 100]
    out = limit_pairs(q, 1, 128)
    assert pairs_over(q, 1, 128) > 0 and pairs_over(out, 1, 128) == 0
    assert list(out[:2, 0]) == [64, 64]  # excess 126 split evenly
    assert list(out[2:4, 0]) == [-78, 50]  # excess 100: the larger gives the odd unit
    assert np.array_equal(out[32], q[32])  # the odd K's last element pairs with padding
    ok = (np.abs(q[0:32:2].astype(int)) + np.abs(q[1:32:2].astype(int))) <= 128
    assert np.array_equal(out[0:32:2][ok], q[0:32:2][ok])  # in-limit pairs untouched
    assert np.array_equal(np.sign(out[out != 0]), np.sign(q[out != 0]))  # no sign flips
    # A Gemm's transposed weight [N, K] with channel axis 0 gives the same pairs.
    assert np.array_equal(limit_pairs(q.T.copy(), 0, 128), out.T)


def test_pair_limited_scales_fit_every_pair_more_finely_than_7_bit_weights() -> None:
    w = np.random.default_rng(6).standard_normal((384, 16)).astype(np.float32)
    spec = QuantSpec(8, "channel", axis=1, pair_limit=128)
    scales = weight_scales(w, spec)
    absmax = np.abs(w).max(axis=0)
    assert (scales >= absmax / 127).all() and (scales <= 2 * absmax / 127 + 1e-6).all()
    q = quantize_weight(w, spec, scales)
    assert pairs_over(q, 1, 128) == 0 and np.abs(q).max() > 63
    seven_bit = (absmax / 63).astype(np.float32)  # ONNX Runtime's reduce_range
    q7 = np.clip(np.rint(w / seven_bit), -64, 63)
    err = np.abs(dequantize_weight(q, spec, scales) - w).mean()
    assert err < np.abs(q7 * seven_bit - w).mean()
    # Scales from elsewhere (here the full-range ones) are made safe by limiting the pairs.
    full = weight_scales(w, QuantSpec(8, "channel", axis=1))
    free = quantize_weight(w, QuantSpec(8, "channel", axis=1), full)
    assert pairs_over(free, 1, 128) > 0
    assert np.array_equal(quantize_weight(w, spec, full), limit_pairs(free, 1, 128))
