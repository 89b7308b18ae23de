"""kernels/: ONNX packing, numpy references, Triton kernels (CPU interpreter), AOT PTX.

The Triton kernels run under Triton's CPU interpreter. Random inputs are fresh on every
run; each failure message carries the seed, and SFC_TEST_SEED=<seed> replays it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

# Must be set before triton is imported: triton.jit decides at decoration time whether a
# kernel is compiled for a GPU or run by the interpreter, and this machine has no GPU.
os.environ["TRITON_INTERPRET"] = "1"

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, numpy_helper

from sfc.errors import SfcError
from sfc.kernels import reference
from sfc.kernels.packing import (
    pack,
    pack_int2,
    pack_int4,
    packed_size,
    unpack,
    unpack_int2,
    unpack_int4,
)
from sfc.quant.qdq import _int_tensor
from sfc.quant.spec import QuantSpec
from sfc.quant.weights import dequantize_weight, quantize_weight, weight_scales

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install triton); the kernels need it")
torch = pytest.importorskip("torch")
tg = pytest.importorskip("sfc.kernels.triton_gemm")

_STORAGE = {4: ml_dtypes.int4, 2: ml_dtypes.int2}
_FLOAT_TOL = 1e-3  # relative Frobenius error of fp32-accumulated results vs float64


class Seeded:
    """A fresh random generator whose seed goes into every failure message."""

    def __init__(self) -> None:
        env = os.environ.get("SFC_TEST_SEED")
        self.seed = int(env) if env else int(np.random.default_rng().integers(2**63))
        self.rng = np.random.default_rng(self.seed)

    def ints(self, bits: int, shape: tuple[int, ...]) -> np.ndarray:
        lo = -(1 << (bits - 1))
        return self.rng.integers(lo, -lo, size=shape).astype(np.int8)

    def __str__(self) -> str:
        return f"seed {self.seed} (replay: SFC_TEST_SEED={self.seed})"


@pytest.fixture
def rnd() -> Seeded:
    return Seeded()


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    diff = np.asarray(actual, np.float64) - np.asarray(expected, np.float64)
    return float(np.linalg.norm(diff) / np.linalg.norm(np.asarray(expected, np.float64)))


# -- packing ------------------------------------------------------------------------------

SHAPES = [(1,), (7,), (3, 5), (5, 3, 3), (40, 37), (13, 38), (64, 24)]


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_packing_equals_onnx_raw_data(bits: int, shape: tuple[int, ...], rnd: Seeded) -> None:
    q = rnd.ints(bits, shape)
    ours = pack(q, bits)
    onnx_bytes = numpy_helper.from_array(q.astype(_STORAGE[bits])).raw_data
    assert ours.dtype == np.uint8 and ours.ndim == 1, rnd
    assert ours.size == packed_size(q.size, bits), rnd
    assert ours.tobytes() == onnx_bytes, rnd
    assert np.array_equal(unpack(ours, shape, bits), q), rnd


def test_packing_layout_by_hand() -> None:
    # 4-bit: first element in the low nibble; the odd count pads the last byte with zero.
    assert pack_int4(np.array([1, -1, 7], np.int8)).tolist() == [0xF1, 0x07]
    # 2-bit: x0 | x1<<2 | x2<<4 | x3<<6 with two's complement fields (-2 = 0b10, -1 = 0b11).
    assert pack_int2(np.array([1, -2, -1, 0, -1], np.int8)).tolist() == [0b00111001, 0b11]
    assert unpack_int4(np.array([0xF1, 0x07], np.uint8), (3,)).tolist() == [1, -1, 7]
    assert unpack_int2(np.array([0b00111001, 0b11], np.uint8), (5,)).tolist() == [1, -2, -1, 0, -1]


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8", "int16"])
def test_packing_takes_any_integer_dtype(dtype: str) -> None:
    q = np.array([[0, 1], [1, 0]], dtype=dtype)
    assert pack_int2(q).tolist() == pack_int2(q.astype(np.int8)).tolist()


def test_packing_rejects_bad_input() -> None:
    with pytest.raises(SfcError, match=r"\[-8, 7\]"):
        pack_int4(np.array([8], np.int8))
    with pytest.raises(SfcError, match=r"\[-2, 1\]"):
        pack_int2(np.array([-3], np.int8))
    with pytest.raises(SfcError, match="integer array"):
        pack_int4(np.array([1.0], np.float32))
    with pytest.raises(SfcError, match="integer array"):
        pack_int2(np.array([True]))
    with pytest.raises(SfcError, match="4 and 2 bits"):
        pack(np.array([1], np.int8), 3)
    with pytest.raises(SfcError, match="uint8"):
        unpack_int4(np.array([1], np.int8), (2,))
    with pytest.raises(SfcError, match="3 bytes"):
        unpack_int4(np.zeros(2, np.uint8), (5,))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape", [(), (1,), (40, 37), (13, 38)])
def test_qdq_writer_tensors_unchanged(bits: int, shape: tuple[int, ...], rnd: Seeded) -> None:
    """The QDQ writer's integer initializers are byte-identical to onnx's own packing."""
    q = rnd.ints(bits, shape)
    ours = _int_tensor(q, bits, "w")
    storage = np.int8 if bits == 8 else _STORAGE[bits]
    onnx_tensor = numpy_helper.from_array(q.astype(storage), "w")
    assert ours.SerializeToString() == onnx_tensor.SerializeToString(), rnd
    expected_type = {8: TensorProto.INT8, 4: TensorProto.INT4, 2: TensorProto.INT2}[bits]
    assert ours.data_type == expected_type


# -- numpy references ---------------------------------------------------------------------


def _qdq_weight(rnd: Seeded, bits: int, k: int, n: int,
                block: int) -> tuple[QuantSpec, np.ndarray, np.ndarray, np.ndarray]:
    """A float weight quantized by sfc's own code: (spec, q int8 [K, N], scales, packed)."""
    spec = QuantSpec(bits, "block", 0, block)
    w = rnd.rng.standard_normal((k, n)).astype(np.float32) * 0.05
    scales = weight_scales(w, spec)
    q = quantize_weight(w, spec, scales)
    # The initializer exactly as the QDQ writer emits it.
    packed = np.frombuffer(_int_tensor(q, bits, "w").raw_data, dtype=np.uint8)
    return spec, q, scales, packed


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize(("k", "n", "block"), [(40, 24, 16), (100, 36, 32), (100, 37, 64)])
def test_reference_matches_dequantize_then_matmul(bits: int, k: int, n: int, block: int,
                                                  rnd: Seeded) -> None:
    spec, q, scales, packed = _qdq_weight(rnd, bits, k, n, block)
    tensor = numpy_helper.to_array(_int_tensor(q, bits, "w"))  # onnx's own unpacking
    assert np.array_equal(tensor.astype(np.int8), q), rnd
    x = rnd.rng.standard_normal((5, k)).astype(np.float32)
    expected = x.astype(np.float64) @ dequantize_weight(q, spec, scales).astype(np.float64)
    gemm = reference.w4a16_gemm if bits == 4 else reference.w2a16_gemm
    y = gemm(x, packed, scales, k, n, block)
    assert y.dtype == np.float32
    assert _rel(y, expected) < 1e-6, rnd


def test_reference_int_gemm_is_exact(rnd: Seeded) -> None:
    xq = rnd.ints(8, (3, 70))
    wq = rnd.ints(8, (70, 5))
    acc = reference.int_gemm_int32(xq, wq)
    assert acc.dtype == np.int32
    expected = [[sum(int(xq[i, t]) * int(wq[t, j]) for t in range(70)) for j in range(5)]
                for i in range(3)]
    assert acc.tolist() == expected, rnd
    w_scales = rnd.rng.uniform(1e-3, 1e-2, 5).astype(np.float32)
    y = reference.w8a8_gemm(xq, wq, 0.03, w_scales)
    assert _rel(y, np.array(expected) * 0.03 * w_scales.astype(np.float64)) < 1e-6, rnd


def test_reference_rejects_bad_shapes() -> None:
    packed = np.zeros(packed_size(40 * 24, 4), np.uint8)
    with pytest.raises(SfcError, match="scales have shape"):
        reference.w4a16_gemm(np.zeros((1, 40)), packed, np.ones((2, 24)), 40, 24, 16)
    with pytest.raises(SfcError, match=r"\[M, 40\]"):
        reference.w4a16_gemm(np.zeros((1, 41)), packed, np.ones((3, 24)), 40, 24, 16)
    with pytest.raises(SfcError, match="overflows int32"):
        big = 131073  # one more than 2**31 / 128**2 products of -128 * -128
        reference.int_gemm_int32(np.full((1, big), -128, np.int8),
                                 np.full((big, 1), -128, np.int8))


# -- Triton kernels (interpreter) ---------------------------------------------------------


def _t(a: np.ndarray) -> Any:  # a torch.Tensor sharing a's memory
    return torch.from_numpy(np.ascontiguousarray(a))


def _run_lowbit(rnd: Seeded, bits: int, m: int, k: int, n: int, block: int,
                scale_dtype: str = "float16", x_dtype: str = "float16",
                **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
    """(Triton result as float32, float64 reference) on fresh random inputs."""
    q = rnd.ints(bits, (k, n))
    scales = rnd.rng.uniform(0.005, 0.05, (-(-k // block), n)).astype(scale_dtype)
    x = rnd.rng.standard_normal((m, k)).astype(x_dtype)
    packed = pack(q, bits)
    launch = tg.w4a16_gemm if bits == 4 else tg.w2a16_gemm
    # NaN-poisoned: every output element must be written.
    out = torch.full((m, n), float("nan"), dtype=getattr(torch, x_dtype))
    y = launch(_t(x), _t(packed), _t(scales), k, n, block, out=out, **kwargs)
    assert y is out
    gemm = reference.w4a16_gemm if bits == 4 else reference.w2a16_gemm
    return y.numpy().astype(np.float32), gemm(x, packed, scales, k, n, block)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize(("k", "n", "block"), [(40, 24, 16), (100, 36, 32), (100, 36, 64)])
def test_lowbit_kernel_matches_reference(bits: int, m: int, k: int, n: int, block: int,
                                         rnd: Seeded) -> None:
    y, expected = _run_lowbit(rnd, bits, m, k, n, block)
    assert np.isfinite(y).all(), f"unwritten or non-finite output, {rnd}"
    err = _rel(y, expected)
    assert err <= _FLOAT_TOL, f"W{bits}A16 M={m} K={k} N={n} block={block}: rel {err:.2e}, {rnd}"


@pytest.mark.parametrize(("bits", "n"), [(4, 37), (2, 38), (2, 37)])
def test_lowbit_kernel_rows_that_start_mid_byte(bits: int, n: int, rnd: Seeded) -> None:
    """N not a multiple of the elements per byte: a packed byte straddles two rows."""
    y, expected = _run_lowbit(rnd, bits, 3, 40, n, 16, scale_dtype="float32")
    err = _rel(y, expected)
    assert err <= _FLOAT_TOL, f"W{bits}A16 N={n}: rel {err:.2e}, {rnd}"


@pytest.mark.parametrize("bits", [4, 2])
def test_lowbit_kernel_float32_activations(bits: int, rnd: Seeded) -> None:
    """fp32 in and out (rounded to fp16 on load), as the TensorRT plugin node runs it."""
    y, expected = _run_lowbit(rnd, bits, 3, 100, 36, 32, "float32", x_dtype="float32")
    err = _rel(y, expected)
    assert err <= _FLOAT_TOL, f"W{bits}A16 fp32 activations: rel {err:.2e}, {rnd}"


@pytest.mark.parametrize("tiles", [(16, 16, 16), (32, 64, 32), (16, 128, 16)])
def test_lowbit_kernel_other_tiles(tiles: tuple[int, int, int], rnd: Seeded) -> None:
    y, expected = _run_lowbit(rnd, 4, 17, 100, 36, 32, tiles=tiles)
    err = _rel(y, expected)
    assert err <= _FLOAT_TOL, f"tiles {tiles}: rel {err:.2e}, {rnd}"


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize(("m", "split_k", "x_dtype"),
                         [(1, 3, "float16"), (3, 7, "float32"), (17, 2, "float16")])
def test_lowbit_kernel_split_k(bits: int, m: int, split_k: int, x_dtype: str,
                               rnd: Seeded) -> None:
    """K split 2, 3 or 7 ways (7 > the 4 K tiles: idle slices add zeros) equals the reference,
    into a NaN-poisoned output, fp16 or fp32."""
    y, expected = _run_lowbit(rnd, bits, m, 100, 36, 32, x_dtype=x_dtype, tiles=(16, 32, 32),
                              split_k=split_k)
    err = _rel(y, expected)
    assert err <= _FLOAT_TOL, f"W{bits}A16 M={m} split {split_k}: rel {err:.2e}, {rnd}"


def test_split_k_only_for_decode_shapes() -> None:
    # tiny.en fc2 at M = 1: 6 output tiles of 64 columns, 24 K tiles of 64 rows.
    assert tg.split_k_for(1, 384, 1536, (16, 64, 64)) == 21  # 126 programs
    assert tg.split_k_for(1, 384, 128, (16, 64, 64)) == 2  # never more than the K tiles
    assert tg.split_k_for(1500, 384, 1536, (64, 64, 64)) == 1  # 144 tiles fill the GPU
    assert tg.split_k_for(1, 8192, 1536, (16, 64, 64)) == 1


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize(("k", "n"), [(40, 24), (100, 36)])
def test_int8_kernel_accumulator_exact(m: int, k: int, n: int, rnd: Seeded) -> None:
    xq, wq = rnd.ints(8, (m, k)), rnd.ints(8, (k, n))
    out = torch.full((m, n), -7, dtype=torch.int32)
    acc = tg.int8_gemm_int32(_t(xq), _t(wq), out=out)
    assert acc.dtype == torch.int32
    assert np.array_equal(acc.numpy(), reference.int_gemm_int32(xq, wq)), rnd


def test_int8_kernel_exact_beyond_float32(rnd: Seeded) -> None:
    """Accumulators above 2**24 with odd values: only a true integer accumulator is exact."""
    k, n = 1100, 24
    xq = np.full((2, k), -128, np.int8)
    wq = np.full((k, n), -128, np.int8)
    # (-127)^2 is the only odd product: the columns given it have odd sums.
    xq[:, 0] = -127
    wq[0, rnd.rng.integers(0, n, 7)] = -127
    expected = reference.int_gemm_int32(xq, wq)
    assert expected.max() > 2**24 and (expected % 2 == 1).any()
    acc = tg.int8_gemm_int32(_t(xq), _t(wq))
    assert np.array_equal(acc.numpy(), expected), rnd


@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 40, 24), (17, 100, 36)])
def test_w8a8_kernel_scaled(out_dtype: str, m: int, k: int, n: int, rnd: Seeded) -> None:
    xq, wq = rnd.ints(8, (m, k)), rnd.ints(8, (k, n))
    w_scales = rnd.rng.uniform(1e-4, 1e-3, n).astype(np.float32)
    x_scale = float(rnd.rng.uniform(0.01, 0.1))
    dtype = getattr(torch, out_dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    y = tg.w8a8_gemm(_t(xq), _t(wq), x_scale, _t(w_scales), out_dtype=dtype, out=out)
    expected = reference.w8a8_gemm(xq, wq, x_scale, w_scales)
    err = _rel(y.numpy(), expected)
    assert err <= _FLOAT_TOL, f"W8A8 {out_dtype} M={m}: rel {err:.2e}, {rnd}"


def test_int8_kernel_reads_strided_weights(rnd: Seeded) -> None:
    """A transposed view ([N, K] storage, as Gemm transB keeps it) needs no copy."""
    xq, wt = rnd.ints(8, (3, 40)), rnd.ints(8, (24, 40))
    acc = tg.int8_gemm_int32(_t(xq), _t(wt).t())
    assert np.array_equal(acc.numpy(), reference.int_gemm_int32(xq, wt.T.copy())), rnd


def test_launchers_reject_bad_input() -> None:
    k, n = 40, 24
    x = torch.zeros((2, k), dtype=torch.float16)
    packed = torch.zeros(packed_size(k * n, 4), dtype=torch.uint8)
    scales = torch.ones((3, n), dtype=torch.float16)
    with pytest.raises(SfcError, match="float16/float32"):
        tg.w4a16_gemm(x.double(), packed, scales, k, n, 16)
    with pytest.raises(SfcError, match="packed bytes"):
        tg.w2a16_gemm(x, packed, scales, k, n, 16)  # INT4-sized bytes for an INT2 weight
    with pytest.raises(SfcError, match="scales"):
        tg.w4a16_gemm(x, packed, scales[:2], k, n, 16)
    with pytest.raises(SfcError, match="power of two"):
        tg.w4a16_gemm(x, packed, torch.ones((2, n), dtype=torch.float16), k, n, 24)
    with pytest.raises(SfcError, match="must divide"):
        tg.w4a16_gemm(x, packed, scales, k, n, 16, tiles=(16, 32, 32))
    with pytest.raises(SfcError, match="split_k must be >= 1"):
        tg.w4a16_gemm(x, packed, scales, k, n, 16, split_k=0)
    with pytest.raises(SfcError, match="out must be"):
        tg.w4a16_gemm(x, packed, scales, k, n, 16, out=torch.empty((2, n)))
    xq = torch.zeros((2, k), dtype=torch.int8)
    with pytest.raises(SfcError, match="cannot multiply"):
        tg.int8_gemm_int32(xq, torch.zeros((k + 1, n), dtype=torch.int8))
    with pytest.raises(SfcError, match="w_scales"):
        tg.w8a8_gemm(xq, torch.zeros((k, n), dtype=torch.int8), 0.1, torch.ones(n + 1))


# -- AOT PTX ------------------------------------------------------------------------------

_AOT_SCRIPT = textwrap.dedent("""
    import json, sys
    from sfc.errors import SfcError
    from sfc.kernels.aot import compile_lowbit
    try:
        w2 = compile_lowbit(2, 64, arch=87, activation_dtype="float32", ptx_version=85)
        w4 = compile_lowbit(4, 32, arch=90, scale_dtype="float16", tiles=(64, 64, 32),
                            aligned=True)
    except SfcError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(0)
    print(json.dumps({k.arch: {"name": k.name, "ptx": k.ptx, "threads": k.threads_per_block,
                               "shared": k.shared_mem_bytes, "scalars": k.scalar_args,
                               "grid": k.grid(1500, 384)} for k in (w2, w4)}))
""")


def test_aot_ptx_without_a_gpu() -> None:
    # Its own process: a process that imported triton under TRITON_INTERPRET=1 cannot
    # generate code (triton.language's helpers were built for the interpreter).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; 1 is its default
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "error" in result:
        pytest.skip(f"Triton cannot compile PTX on this machine: {result['error']}")
    w2, w4 = result["87"], result["90"]
    assert f".entry {w2['name']}(" in w2["ptx"]
    assert ".target sm_87" in w2["ptx"] and ".version 8.5" in w2["ptx"]
    assert ".target sm_90a" in w4["ptx"]
    assert w2["threads"] == 128 and w2["shared"] >= 0
    assert w2["scalars"] == ["M", "N", "K", "stride_xm", "stride_xk", "stride_sk", "stride_sn",
                             "stride_ym", "stride_yn"]
    assert w2["grid"] == [94, 12, 1] and w4["grid"] == [24, 6, 1]  # decode tiles: BLOCK_N 32


def test_aot_refuses_under_the_interpreter() -> None:
    from sfc.kernels.aot import compile_lowbit

    with pytest.raises(SfcError, match="TRITON_INTERPRET"):
        compile_lowbit(2, 64)
    with pytest.raises(SfcError, match="4- and 2-bit"):
        compile_lowbit(8, 64)
