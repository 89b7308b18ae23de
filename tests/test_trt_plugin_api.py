"""The INT2 plugin's calls into `tensorrt.plugin`, against a stand-in of its documented API.

TensorRT cannot be installed here. The stand-in below mirrors what TensorRT's own
`tensorrt.plugin` sources and QDP samples document (python/packaging/bindings_wheel/
tensorrt/plugin/_tensor.py, _top_level.py, _validate.py; samples/python/
quickly_deployable_plugins): a `ShapeExpr` is one dimension, a shape is `ShapeExprs`,
`cdiv` refuses two ints, `KernelLaunchParams` has only the grid/block/shared_mem fields,
extra kernel arguments must be `SymInt32`, and the decorators check each function's
parameter names and (class, not string) annotations. Dimensions here are concrete ints
wrapped as expressions, so the test can read the values back.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import pytest

from sfc.errors import SfcError
from sfc.kernels import trt_plugin
from sfc.kernels.aot import AotKernel
from sfc.kernels.trt_plugin import PLUGIN, launch_args, output_shape, scalar_values


class SymInt32:
    """A symbolic int32 (here: a known value)."""

    def __init__(self, value: Any) -> None:
        if isinstance(value, SymInt32):
            value = value.value
        if not isinstance(value, int):
            raise TypeError(f"SymInt32 takes an int or a SymInt32, not {type(value)}")
        self.value: int = value

    def __mul__(self, other: Any) -> ShapeExpr:
        return ShapeExpr(self.value * SymInt32(other).value)

    def __floordiv__(self, other: Any) -> ShapeExpr:
        return ShapeExpr(self.value // SymInt32(other).value)


class ShapeExpr(SymInt32):
    """One dimension."""


class SymExprs:
    def __init__(self, length: int) -> None:
        self.items: list[Any] = [None] * length

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class ShapeExprs(SymExprs):
    """A shape: one `ShapeExpr` per dimension."""

    @classmethod
    def from_tuple(cls, exprs: tuple[Any, ...]) -> ShapeExprs:
        inst = cls(len(exprs))
        inst.items = [e if isinstance(e, ShapeExpr) else ShapeExpr(e) for e in exprs]
        return inst

    def numel(self) -> ShapeExpr:
        out = ShapeExpr(1)
        for dim in self.items:
            out = out * dim
        return out


class SymIntExprs(SymExprs):
    @classmethod
    def from_tuple(cls, exprs: list[Any]) -> SymIntExprs:
        inst = cls(len(exprs))
        inst.items = [e if isinstance(e, SymInt32) else SymInt32(e) for e in exprs]
        return inst


def cdiv(first: Any, second: Any) -> ShapeExpr:
    if isinstance(first, int) and isinstance(second, int):
        raise ValueError("Both arguments cannot be 'int's")
    a, b = SymInt32(first).value, SymInt32(second).value
    return ShapeExpr(-(-a // b))


class KernelLaunchParams:
    _FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __init__(self) -> None:
        for name in self._FIELDS:
            setattr(self, name, 0 if name == "shared_mem" else 1)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._FIELDS:
            raise AttributeError(f"KernelLaunchParams object has no attribute '{name}'")
        self.__dict__[name] = SymInt32(value)


class TensorDesc:
    def __init__(self, dims: tuple[int, ...]) -> None:
        self.shape_expr: Any = ShapeExprs.from_tuple(dims)

    def like(self) -> TensorDesc:
        return TensorDesc(tuple(d.value for d in self.shape_expr.items))


class AutoTuneCombination:
    def __init__(self, io_types: str, layouts: str = "LINEAR") -> None:
        self.io_types, self.layouts = io_types, layouts


def _names(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _fake_trtp(registry: dict[str, Callable[..., Any]]) -> types.ModuleType:
    """`tensorrt.plugin` with decorators that check signatures as TensorRT's `_validate`."""
    mod = types.ModuleType("tensorrt.plugin")
    attrs: list[str] = []
    tensors: list[str] = []

    def register(plugin_id: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            sig = inspect.signature(fn)
            for name, param in sig.parameters.items():
                ann = param.annotation
                assert inspect.isclass(ann), f"{name}: annotation {ann!r} is not a class"
                if issubclass(ann, TensorDesc):
                    assert not attrs, "TensorDescs come before attributes"
                    tensors.append(name)
                else:
                    assert ann in (int, float, bytes, bool, str), ann
                    attrs.append(name)
            assert inspect.isclass(sig.return_annotation)
            assert issubclass(sig.return_annotation, TensorDesc)
            registry[f"register {plugin_id}"] = fn
            return fn
        return wrap

    def autotune(plugin_id: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            names = _names(fn)
            assert names[: len(tensors)] == tensors and names[-1] == "outputs"
            assert set(names[len(tensors):-1]) <= set(attrs)
            ret = inspect.signature(fn).return_annotation
            assert typing.get_origin(ret) is list
            assert all(issubclass(a, AutoTuneCombination) for a in typing.get_args(ret))
            registry[f"autotune {plugin_id}"] = fn
            return fn
        return wrap

    def aot_impl(plugin_id: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            names = _names(fn)
            assert names[: len(tensors)] == tensors and names[-2:] == ["outputs", "tactic"]
            chosen = names[len(tensors):-2]
            assert chosen == [a for a in attrs if a in chosen]  # registration order
            ret = inspect.signature(fn).return_annotation
            assert typing.get_origin(ret) is tuple
            args = typing.get_args(ret)
            assert len(args) == 4
            for text in args[:2]:
                assert set(typing.get_args(text) or (text,)) <= {str, bytes}
            assert issubclass(args[2], KernelLaunchParams) and issubclass(args[3], SymExprs)
            registry[f"aot_impl {plugin_id}"] = fn
            return fn
        return wrap

    for name, value in dict(
            register=register, autotune=autotune, aot_impl=aot_impl, TensorDesc=TensorDesc,
            AutoTuneCombination=AutoTuneCombination, KernelLaunchParams=KernelLaunchParams,
            SymExprs=SymExprs, SymIntExprs=SymIntExprs, ShapeExprs=ShapeExprs,
            ShapeExpr=ShapeExpr, SymInt32=SymInt32, cdiv=cdiv).items():
        setattr(mod, name, value)
    return mod


FAKE = _fake_trtp({})
KERNEL = AotKernel(name="lowbit_a16_kernel", ptx=".entry lowbit_a16_kernel(", arch=87,
                   num_warps=4, threads_per_block=128, shared_mem_bytes=4096, block_m=16,
                   block_n=64, scalar_args=("M", "N", "K", "stride_xm", "stride_xk",
                                            "stride_sk", "stride_sn", "stride_ym",
                                            "stride_yn"),
                   global_scratch_size=0, profile_scratch_size=0)


def _values(exprs: SymExprs) -> list[int]:
    return [e.value for e in exprs.items]


def test_output_shape_is_shape_exprs_keeping_leading_dims() -> None:
    x = ShapeExprs.from_tuple((2, 5, 384))
    out = output_shape(x, 1536, FAKE)
    assert isinstance(out, ShapeExprs) and _values(out) == [2, 5, 1536]
    assert all(isinstance(d, ShapeExpr) for d in out.items)
    assert _values(output_shape(ShapeExprs.from_tuple((7, 64)), 32, FAKE)) == [7, 32]
    with pytest.raises(SfcError, match="rank >= 2"):
        output_shape(ShapeExprs.from_tuple((384,)), 1536, FAKE)


def test_launch_grid_covers_the_output_and_args_follow_the_kernel() -> None:
    x = ShapeExprs.from_tuple((3, 7, 384))  # M = 21 rows of K = 384
    params, extra = launch_args(KERNEL, x, 1000, 384, FAKE)
    m, n = 21, 1000
    grid_x, grid_y = params.grid_x.value, params.grid_y.value
    assert (grid_x - 1) * KERNEL.block_m < m <= grid_x * KERNEL.block_m
    assert (grid_y - 1) * KERNEL.block_n < n <= grid_y * KERNEL.block_n
    assert params.block_x.value == KERNEL.threads_per_block
    assert params.shared_mem.value == KERNEL.shared_mem_bytes
    assert isinstance(extra, SymIntExprs) and all(type(e) is SymInt32 for e in extra.items)
    assert _values(extra) == scalar_values(KERNEL.scalar_args, m, n, 384)
    assert _values(extra)[:3] == [m, n, 384]


def test_plugin_registers_against_the_documented_schemas(
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry: dict[str, Callable[..., Any]] = {}
    package, plugin = types.ModuleType("tensorrt"), _fake_trtp(registry)
    setattr(package, "plugin", plugin)  # noqa: B010  (a module built at run time)
    monkeypatch.setitem(sys.modules, "tensorrt", package)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
    monkeypatch.setattr(trt_plugin, "_registered", False)
    asked: list[tuple[int, bool]] = []

    def compile_kernel(block_size: int, aligned: bool) -> AotKernel:
        asked.append((block_size, aligned))
        return KERNEL

    trt_plugin.register_plugins(compile_kernel)
    assert set(registry) == {f"{kind} {PLUGIN}" for kind in ("register", "autotune", "aot_impl")}
    x, packed, scales = TensorDesc((1, 4, 384)), TensorDesc((384 * 96,)), TensorDesc((12, 384))
    out = registry[f"register {PLUGIN}"](x, packed, scales, 384, 384, 32)
    assert _values(out.shape_expr) == [1, 4, 384] and out is not x
    (combo,) = registry[f"autotune {PLUGIN}"](x, packed, scales, (out,))
    assert combo.io_types.count(",") == 3  # x, packed, scales, then the output
    name, ptx, params, extra = registry[f"aot_impl {PLUGIN}"](x, packed, scales, 384, 384,
                                                              32, (out,), 0)
    assert asked == [(32, True)] and (name, ptx) == (KERNEL.name, KERNEL.ptx)
    assert params.grid_x.value == 1 and _values(extra)[:3] == [4, 384, 384]
    # N = 38: rows start mid-byte, so the kernel compiled for it gathers fields.
    registry[f"aot_impl {PLUGIN}"](TensorDesc((1, 4, 384)), TensorDesc((384 * 38 // 4,)),
                                   TensorDesc((12, 38)), 384, 38, 32, (out,), 0)
    assert asked == [(32, True), (32, False)]
    trt_plugin.register_plugins(compile_kernel)  # once per process
    assert len(asked) == 2


def test_stand_in_rejects_what_tensorrt_rejects() -> None:
    """The stand-in is strict where the fixed calls used to go wrong."""
    with pytest.raises(TypeError):
        ShapeExpr([ShapeExpr(2), 1536])  # the old call: a list is not one dimension
    with pytest.raises(ValueError, match="int"):
        cdiv(1536, 64)  # the old grid_y: two build-time ints
    with pytest.raises(AttributeError):
        KernelLaunchParams().grid = 1
