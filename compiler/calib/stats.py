"""Streaming activation statistics with bounded memory.

One pass over the calibration set: each requested tensor keeps a count, running min / max /
absmax and a fixed-size histogram of |x|. Activations are dropped as soon as they are counted,
so memory is O(tensors x bins) however long the calibration set is.

The histogram range grows online (no separate max pass, unlike TensorRT's two-pass
calibrator): when a batch exceeds the range, the range is multiplied by a power of two 2**k and
every 2**k neighbouring bins are summed. Because the bin edges of the wider histogram are a
subset of the old edges, earlier counts land exactly where they would have landed had the
final range been known from the start; the price is a range of up to 2x the final absmax
(at worst half of the bins lie above it).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import SfcError, first_line
from ..progress import progress_bar
from ..runtime.session import session_options

__all__ = ["DEFAULT_BINS", "StatsPass", "StatsSnapshot", "TensorStats", "collect_stats"]

DEFAULT_BINS = 2048
# Protobuf cannot serialise a message of 2 GiB or more: such models go through a file.
_MAX_INLINE_BYTES = 2**31 - 1


@dataclass(frozen=True, eq=False)
class StatsSnapshot:
    """Immutable statistics of one tensor: what calibration methods read.

    `hist[j]` counts values with j * bin_width <= |x| < (j + 1) * bin_width, where
    bin_width = hist_max / len(hist). `hist_max` is 0.0 only while every value seen was
    exactly zero (then all counts sit in bin 0). An empty snapshot (count 0) has all
    scalars 0.0.
    """

    name: str
    count: int
    absmax: float
    min: float
    max: float
    hist_max: float
    hist: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        hist = np.array(self.hist, dtype=np.int64, copy=True)
        if hist.ndim != 1 or hist.size < 1:
            raise SfcError(f"statistics of tensor '{self.name}': histogram must be 1-D, non-empty")
        hist.setflags(write=False)  # the snapshot is immutable, its array too
        object.__setattr__(self, "hist", hist)
        scalars = (self.absmax, self.min, self.max, self.hist_max)
        if not all(math.isfinite(v) for v in scalars):
            raise SfcError(f"statistics of tensor '{self.name}' are not finite")
        if self.count < 0 or int(hist.sum()) != self.count or (hist < 0).any():
            raise SfcError(f"statistics of tensor '{self.name}': histogram does not sum to count")
        if self.count and not (self.min <= self.max and self.absmax == max(-self.min, self.max)):
            raise SfcError(f"statistics of tensor '{self.name}': inconsistent min/max/absmax")
        if self.hist_max < 0 or (self.absmax > 0 and self.absmax >= self.hist_max):
            raise SfcError(f"statistics of tensor '{self.name}': histogram range below absmax")

    @property
    def bins(self) -> int:
        """Number of histogram bins."""
        return int(self.hist.size)

    @property
    def bin_width(self) -> float:
        """Width of one histogram bin (0.0 when all values were zero)."""
        return self.hist_max / self.bins

    def bin_edges(self) -> np.ndarray:
        """The bins + 1 edges of the |x| histogram, from 0 to hist_max."""
        return np.arange(self.bins + 1, dtype=np.float64) * self.bin_width

    def percentile(self, q: float) -> float:
        """The q-th percentile (0 < q <= 100) of |x|, interpolated inside its bin.

        Accurate to one bin width; never above absmax.
        """
        if not 0.0 < q <= 100.0:
            raise SfcError(f"percentile must be in (0, 100], got {q}")
        if self.count == 0 or self.absmax == 0.0:
            return 0.0
        cdf = np.cumsum(self.hist)
        target = q / 100.0 * self.count
        j = min(int(np.searchsorted(cdf, target, side="left")), self.bins - 1)
        below = float(cdf[j - 1]) if j else 0.0
        # Linear interpolation assumes values spread uniformly inside the bin.
        frac = (target - below) / float(self.hist[j]) if self.hist[j] else 1.0
        return min((j + min(max(frac, 0.0), 1.0)) * self.bin_width, self.absmax)

    def summary(self) -> dict[str, float]:
        """Scalars worth recording next to a scale (JSON-friendly floats)."""
        return {
            "count": float(self.count),
            "absmax": self.absmax,
            "min": self.min,
            "max": self.max,
            "hist_max": self.hist_max,
            "bins": float(self.bins),
        }


class TensorStats:
    """Mutable accumulator for one tensor; `snapshot()` returns the frozen result."""

    __slots__ = ("_absmax", "_bins", "_count", "_hist", "_hist_max", "_max", "_min", "name")

    def __init__(self, name: str, bins: int = DEFAULT_BINS) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise SfcError(f"histogram bins must be a positive integer, got {bins!r}")
        self.name = name
        self._bins = bins
        self._count = 0
        self._min = math.inf
        self._max = -math.inf
        self._absmax = 0.0
        self._hist_max = 0.0  # 0.0: no non-zero value seen yet, range still unset
        self._hist = np.zeros(bins, dtype=np.int64)

    @property
    def count(self) -> int:
        """Values seen so far."""
        return self._count

    def update(self, values: np.ndarray) -> None:
        """Add one batch of values (any shape, any numeric dtype); the batch is not kept."""
        a = np.asarray(values)
        if a.size == 0:
            return
        # Integers and bools are widened; abs(int64 min) would overflow otherwise.
        if a.dtype.kind != "f":
            a = a.astype(np.float64)
        bmin, bmax = float(a.min()), float(a.max())
        if not (math.isfinite(bmin) and math.isfinite(bmax)):
            kind = "NaN" if np.isnan(a).any() else "Inf"
            raise SfcError(f"{kind} in activation statistics of tensor '{self.name}'")
        babs = max(-bmin, bmax)
        self._count += a.size
        self._min = min(self._min, bmin)
        self._max = max(self._max, bmax)
        self._absmax = max(self._absmax, babs)
        if babs == 0.0:
            self._hist[0] += a.size  # zeros belong to bin 0 whatever the range becomes
            return
        if self._hist_max == 0.0:
            # Slightly above absmax so the top value falls strictly inside the last bin:
            # later merges then match direct binning exactly (no clamped edge value).
            self._hist_max = babs * (1.0 + 1.0 / self._bins)
            if not self._hist_max > babs:  # subnormal babs: the product rounds back down
                self._hist_max = math.nextafter(babs, math.inf)
        elif babs >= self._hist_max:
            self._grow(babs)
        # float32 arithmetic for float32/16 activations: ~4x faster than float64, and still
        # exact under the power-of-two range growth (scaling by 2**-k commutes with rounding).
        work = np.float32 if a.dtype.itemsize <= 4 else np.float64
        mag = np.abs(a).astype(work, copy=False).ravel()
        mag *= work(self._bins / self._hist_max)
        idx = mag.astype(np.int64)
        np.minimum(idx, self._bins - 1, out=idx)  # guards float rounding at the top edge only
        self._hist += np.bincount(idx, minlength=self._bins)

    def _grow(self, babs: float) -> None:
        """Widen the range by the smallest 2**k that covers `babs`, merging 2**k bins each."""
        k = max(1, math.ceil(math.log2(babs / self._hist_max)))
        while math.ldexp(self._hist_max, k) <= babs:  # log2 may round down
            k += 1
        new_max = math.ldexp(self._hist_max, k)  # exact: a power-of-two scaling
        # Old bin j covers [j w, (j+1) w); new bin j // 2**k covers it entirely.
        target = np.arange(self._bins, dtype=np.int64) >> min(k, 62)
        merged = np.zeros(self._bins, dtype=np.int64)
        np.add.at(merged, target, self._hist)
        self._hist = merged
        self._hist_max = new_max

    def snapshot(self) -> StatsSnapshot:
        """The statistics so far, frozen."""
        if self._count == 0:
            return StatsSnapshot(self.name, 0, 0.0, 0.0, 0.0, 0.0, self._hist.copy())
        return StatsSnapshot(
            name=self.name,
            count=self._count,
            absmax=self._absmax,
            min=self._min,
            max=self._max,
            hist_max=self._hist_max,
            hist=self._hist.copy(),
        )


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise SfcError(f"model file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf / onnx raise assorted classes
        raise SfcError(f"cannot read ONNX model {path}: {first_line(exc)}") from None


def _with_outputs(model: onnx.ModelProto, names: Sequence[str], large: bool) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (the caller's model is untouched)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    wanted = [n for n in names if n not in present]
    typed = {vi.name: vi for vi in out.graph.value_info}
    if any(n not in typed for n in wanted) and not large:
        # Typed outputs give clearer ORT errors; ORT also accepts untyped ones, so a model
        # that shape inference cannot handle (or a >2 GB one) still calibrates.
        try:
            inferred = onnx.shape_inference.infer_shapes(out, strict_mode=False)
            typed.update({vi.name: vi for vi in inferred.graph.value_info})
        except Exception:
            pass
    for name in wanted:
        vi = onnx.ValueInfoProto()
        if name in typed:
            vi.CopyFrom(typed[name])
        else:
            vi.name = name
        out.graph.output.append(vi)
    return out


def _session(model: onnx.ModelProto, threads: int | None, large: bool,
             tmp: Path) -> ort.InferenceSession:
    # Basic optimisations only: constant folding and the like, no fusions that would
    # reorder float arithmetic around the tensors being observed.
    options = session_options(threads=threads, optimization="basic", arena=False)
    source: str | bytes
    if large:
        path = tmp / "calib.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="calib.onnx.data")
        source = str(path)
    else:
        source = model.SerializeToString()
    try:
        return ort.InferenceSession(source, sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own opaque classes
        raise SfcError(f"ONNX Runtime cannot load the calibration model: "
                       f"{first_line(exc)}") from None


def _progress(label: str | None) -> Any:
    """A progress bar, or None when `label` is None."""
    return None if label is None else progress_bar()


class StatsPass:
    """One instrumented ONNX Runtime session that counts `tensors` (and feeds `grams`,
    tensor -> accumulator with `update(x)`, GPTQ's `GramAccumulator`) for each feed `add`
    is given, and hands back the graph outputs named in `keep`: Whisper's calibration
    decodes with the cross K/V of the very encoder run it counts, so the FP32 encoder runs
    once per utterance, not twice (BENCHMARKS.md, issue 13). A context manager: the
    session goes on exit; `result()` gives the statistics. See `collect_stats`."""

    def __init__(self, model: onnx.ModelProto | str | Path, tensors: Sequence[str], *,
                 bins: int = DEFAULT_BINS, threads: int | None = None,
                 grams: Mapping[str, Any] | None = None, keep: Sequence[str] = ()) -> None:
        if isinstance(tensors, str):
            raise SfcError("collect_stats: tensors must be a sequence of names, not one string")
        self.grams = dict(grams or {})
        self.tensors = list(tensors)
        names = list(dict.fromkeys([*tensors, *self.grams]))
        if not names:
            raise SfcError("collect_stats: no tensors requested")
        proto = _load(model)
        graph = proto.graph
        initializers = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in initializers]
        produced = {o for node in graph.node for o in node.output if o}
        weights = [n for n in names if n in initializers and n not in produced]
        if weights:
            raise SfcError(f"collect_stats: {', '.join(map(repr, weights[:5]))} are "
                           "initializers (weights), not activations")
        unknown = [n for n in names if n not in produced and n not in inputs]
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise SfcError(f"collect_stats: unknown tensor(s) "
                           f"{', '.join(map(repr, unknown[:5]))}{more}: not a graph input or "
                           "node output of the model")
        outputs = {o.name for o in graph.output}
        missing = [n for n in keep if n not in outputs]
        if missing:
            raise SfcError(f"collect_stats: {missing[0]!r} is not an output of the model")
        self.from_feed = [n for n in names if n in inputs]
        self.from_run = [n for n in names if n not in inputs]
        self.keep = list(keep)
        # Histograms only where asked: a tensor fed to `grams` alone needs none.
        self.acc = {n: TensorStats(n, bins) for n in dict.fromkeys(self.tensors)}
        self.seen = 0
        # ByteSize walks the whole message (~0.2 s for 40 MB): once. The margin covers the
        # extra outputs added below.
        large = proto.ByteSize() > _MAX_INLINE_BYTES - 2**20
        self._tmp = tempfile.TemporaryDirectory(prefix="sfc-calib-")
        self._fetch = [*self.from_run, *(n for n in self.keep if n not in self.from_run)]
        try:
            self.session: ort.InferenceSession | None = _session(
                _with_outputs(proto, self._fetch, large) if self._fetch else proto,
                threads, large, Path(self._tmp.name))
        except BaseException:
            self._tmp.cleanup()
            raise
        self._inputs = {i.name for i in self.session.get_inputs()}

    def __enter__(self) -> StatsPass:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session = None
        self._tmp.cleanup()

    def add(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Count one feed; the outputs named in `keep`, in that order."""
        assert self.session is not None, "add after the pass was closed"
        for n in self.from_feed:
            if n not in feed:
                raise SfcError(f"graph input '{n}' is missing from the feed")
            self._count(n, np.asarray(feed[n]))
        self.seen += 1
        if not self._fetch:
            return []
        run_feed = {k: v for k, v in feed.items() if k in self._inputs}
        try:
            outs = self.session.run(self._fetch, run_feed)
        except Exception as exc:  # ORT's opaque classes
            raise SfcError(f"ONNX Runtime failed: {first_line(exc)}") from None
        values = dict(zip(self._fetch, outs, strict=True))
        del outs
        for n in self.from_run:
            self._count(n, values[n])
        # Bounded memory: only the kept outputs outlive one feed.
        return [values[n] for n in self.keep]

    def _count(self, name: str, value: np.ndarray) -> None:
        if name in self.acc:
            self.acc[name].update(value)
        if name in self.grams:
            self.grams[name].update(value)

    def result(self) -> dict[str, StatsSnapshot]:
        """{tensor: snapshot} in the order of `tensors`."""
        if self.seen == 0:
            raise SfcError("collect_stats: the calibration feeds are empty")
        return {n: self.acc[n].snapshot() for n in dict.fromkeys(self.tensors)}


def collect_stats(
    model: onnx.ModelProto | str | Path,
    tensors: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    bins: int = DEFAULT_BINS,
    progress: str | None = "calibrating",
    total: int | None = None,
    threads: int | None = None,
    grams: Mapping[str, Any] | None = None,
) -> dict[str, StatsSnapshot]:
    """Run `model` over `feeds` on ONNX Runtime's CPU provider and return statistics.

    `grams`: tensor -> accumulator with `update(x)` (GPTQ's `GramAccumulator`), fed every
    value of that tensor in the same pass; the tensor need not be in `tensors`.

    `tensors` names node outputs or graph inputs of the main graph (graph inputs are taken
    from the feed). A copy of the model exposes them as extra outputs; ONE session runs every
    feed; each output is counted and dropped. Feed keys that are not graph inputs are ignored.
    `total` sizes the progress bar (defaults to len(feeds) when feeds has a length).
    Returns {tensor name: snapshot} in the order of `tensors`.
    """
    if total is None and isinstance(feeds, Sized):
        total = len(feeds)
    with StatsPass(model, tensors, bins=bins, threads=threads, grams=grams) as stats:
        bar = _progress(progress)
        task = bar.add_task(progress, total=total) if bar is not None else None
        if bar is not None:
            bar.start()
        try:
            for i, feed in enumerate(feeds):
                try:
                    stats.add(feed)
                except SfcError as exc:
                    raise SfcError(f"{exc} (calibration feed #{i})") from None
                if bar is not None:
                    bar.advance(task)
        finally:
            if bar is not None:
                bar.stop()
        return stats.result()
