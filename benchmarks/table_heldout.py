"""Does GPTQ overfit the calibration Gram on Whisper's tied token table? A held-out test.

Whisper's decoder reads one token table twice: a Gather (the embedding) and the last
MatMul (the logits). This script decodes the build's calibration set once, exactly as
`sfc build MODEL --weights 4 --activations none --target ort-cpu` with GPTQ on the table
(`--gptq-tied gptq`; `--gptq-tied` before it took a value) feeds the decoder
(`sfc.build`'s FP32 runtime, Whisper feeds, Gram accumulators and `_stats`), and sums
the Gram X^T X of the logits MatMul's data input separately over the even-indexed clips (half A)
and the odd-indexed clips (half B), plus over all clips (what the build itself sums).
The table, as that MatMul's B weight [K, N], is then quantized with the plan's QuantSpec
(INT4, blocks of 32 along K, a zero point per block on ort-cpu) through the build's own
`_Graph.quantize`:

- mse: no Gram, so `quantize_layer` falls back to MSE-clipped scales, round to nearest
  (the build's rounding of a table left without a Gram, as its QDQ writer recomputes it);
- gptq[A], gptq[B], gptq[A+B]: GPTQ with the build's default `GptqConfig` (act_order,
  damp 0.01, MSE scales) on Gram A, Gram B, or the whole set's Gram (= the table a
  GPTQ-tied build stores).

For each it prints the relative output error tr(E^T G E) / tr(W^T G W), E = W - W_hat,
on G_A, G_B and the whole set's G, and the relative weight error ||E||_F / ||W||_F. GPTQ
on A evaluated on G_B (and on B, on G_A) are the two held-out numbers per model. The
results go to OUT/<model>.json, the three Grams (float64 sums, with their row counts) to
OUT/<model>.grams.npz.

    SFC_CACHE=/tmp/sfccache python benchmarks/table_heldout.py whisper-tiny.en \
        [--out /tmp/table_heldout] [--compare-build BUILD]

`--compare-build`: a GPTQ-tied build folder of the same model, options and
calibration set; its stored table must equal gptq[A+B] (a check that this script's GPTQ
call is the build's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from common import print_table
from onnx import numpy_helper

from sfc.build import (
    BuildConfig,
    _fp32_runtime,
    _grams,
    _prepare,
    _stats,
    _whisper_source,
    target_caps,
)
from sfc.card import ModelCard
from sfc.errors import SfcError
from sfc.eval.manifest import read_manifest
from sfc.models import model_folder
from sfc.quant.gptq import GptqConfig, GramAccumulator
from sfc.quant.lowbit import recipe_method
from sfc.quant.recipe import Recipe
from sfc.quant.stored import STORED_FILE, StoredWeights
from sfc.quant.weights import dequantize_weight

GRAPH = "decoder"
HALVES = ("A", "B")  # A: even clip index, B: odd


class SplitGram:
    """A Gram accumulator for `collect_stats` that sends the i-th update (the i-th
    calibration feed: one clip) to half i % 2 and every update to `whole`."""

    def __init__(self, k: int) -> None:
        self.halves = tuple(GramAccumulator(k) for _ in HALVES)
        self.whole = GramAccumulator(k)
        self.calls = 0

    def update(self, x: np.ndarray) -> None:
        self.halves[self.calls % len(self.halves)].update(x)
        self.whole.update(x)
        self.calls += 1


def tied_table(model: onnx.ModelProto, grams: dict[str, GramAccumulator]) -> str:
    """The one planned weight that a Gather and a Gram-carrying MatMul both read."""
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input}
    tables = sorted(t for t in grams if t in gathered)
    if len(tables) != 1:
        raise SfcError(f"expected one tied table with a Gram, found {tables}")
    return tables[0]


def rel_output_error(w: np.ndarray, e: np.ndarray, gram: np.ndarray) -> float:
    """tr(E^T G E) / tr(W^T G W) (the row count cancels)."""
    return float(np.sum(e * (gram @ e)) / np.sum(w * (gram @ w)))


def compare_build(build: Path, table: str, spec: Any, w: np.ndarray,
                  ours: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """The build's stored table against ours (gptq[A+B])."""
    recipe = Recipe.load(build / GRAPH / "recipe.json")
    if recipe.weight_data is None:
        raise SfcError(f"{build}: the decoder recipe stores no weights (not a GPTQ build)")
    stored = StoredWeights.load(build / GRAPH / STORED_FILE, recipe.weight_data)
    q, scales = stored.get(table, spec, tuple(w.shape))
    return {"build": str(build),
            "integers_equal_fraction": float(np.mean(q == ours[0])),
            "scales_max_abs_diff": float(np.max(np.abs(scales - ours[1]))),
            "identical": bool(np.array_equal(q, ours[0]) and np.array_equal(scales, ours[1]))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    # What `sfc build MODEL --weights 4 --activations none --target ort-cpu` with GPTQ on
    # the table asks for: the defaults otherwise (block 32, GPTQ, GptqConfig(), bundled
    # calibration set).
    # GptqConfig.tied is "auto" | "gptq" | "mse" now, a bool (True: GPTQ) before.
    tied: Any = "gptq" if isinstance(GptqConfig().tied, str) else True
    config = BuildConfig(weights=4, activations=None, target="ort-cpu",
                         gptq=GptqConfig(tied=tied))
    caps = target_caps(config.target)
    folder = model_folder(args.model)
    card = ModelCard.load(folder)
    if card.family != "whisper" or GRAPH not in card.graphs:
        raise SfcError(f"{args.model} is not a Whisper model with a decoder graph")
    model = onnx.load(str(folder / card.graphs[GRAPH].path))
    g = _prepare(GRAPH, model, config, caps, single=False)
    grams = _grams(g.model, g.plan, config.gptq.tied)
    table = tied_table(g.model, grams)
    planned = g.plan.get(table)
    assert planned is not None
    spec = planned.spec
    reader = planned.consumers[0]
    k = grams[table].gram.shape[0]
    split = SplitGram(k)

    utterances = read_manifest(config.calib)[: config.calib_limit]
    runtime = _fp32_runtime(folder)
    transcripts: dict[str, list[int]] = {}
    source = _whisper_source(runtime, utterances, GRAPH, transcripts)
    t0 = time.perf_counter()
    # The build's calibration pass with all of its accumulators (the same extra outputs,
    # so the same ORT graph and numerics), the table's split in halves.
    calib_grams: dict[str, Any] = {**grams, table: split}
    _stats(g.model, g.plan, source.make(), source.count, GRAPH, calib_grams)
    decode_s = time.perf_counter() - t0
    del runtime, source
    if split.calls != len(utterances):
        raise SfcError(f"{split.calls} Gram updates for {len(utterances)} clips")
    acc = {"A": split.halves[0], "B": split.halves[1], "A+B": split.whole}

    w = numpy_helper.to_array(next(t for t in g.model.graph.initializer if t.name == table))
    w64 = w.astype(np.float64)
    t0 = time.perf_counter()
    variants: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, gram in [("mse", None), *((f"gptq[{h}]", acc[h]) for h in acc)]:
        # `_Graph.quantize`, the build's call: quantize_layer -> gptq_quantize with the
        # accumulator's Gram and count, or (no Gram) round_to_nearest with MSE scales.
        g.grams = {} if gram is None else {table: gram}
        g.quantized = {}
        q, scales, method = g.quantize(table, spec, config.weight_method, config.gptq)
        expected = recipe_method(config.weight_method, spec, gram is not None)
        if method != name.split("[")[0] or method != expected:
            raise SfcError(f"{name}: the build's path chose {method}, expected {expected}")
        variants[name] = (q, scales)
    quantize_s = time.perf_counter() - t0

    norm_w = float(np.linalg.norm(w64))
    rows = {}
    for name, (q, scales) in variants.items():
        e = w64 - dequantize_weight(q, spec, scales).astype(np.float64)
        rows[name] = {f"out_err_G_{h}": rel_output_error(w64, e, acc[h].gram) for h in acc}
        rows[name]["weight_err"] = float(np.linalg.norm(e)) / norm_w
    heldout = {
        "gptq[A] on G_B": rows["gptq[A]"]["out_err_G_B"],
        "gptq[B] on G_A": rows["gptq[B]"]["out_err_G_A"],
        "mse on G_B": rows["mse"]["out_err_G_B"],
        "mse on G_A": rows["mse"]["out_err_G_A"],
    }
    heldout["ratio gptq/mse, held-out B"] = heldout["gptq[A] on G_B"] / heldout["mse on G_B"]
    heldout["ratio gptq/mse, held-out A"] = heldout["gptq[B] on G_A"] / heldout["mse on G_A"]
    heldout["ratio gptq/mse, in-sample A"] = (rows["gptq[A]"]["out_err_G_A"]
                                              / rows["mse"]["out_err_G_A"])
    heldout["ratio gptq/mse, in-sample B"] = (rows["gptq[B]"]["out_err_G_B"]
                                              / rows["mse"]["out_err_G_B"])
    ha, hb = (acc[h].gram / acc[h].count for h in HALVES)
    hw = acc["A+B"].gram / acc["A+B"].count
    eig = np.linalg.eigvalsh(hw)
    result: dict[str, Any] = {
        "model": args.model,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "graph": GRAPH,
        "table": table,
        "reader": reader,
        "shape": list(w.shape),
        "spec": spec.describe(),
        "target": config.target,
        "gptq": config.gptq.to_dict(),
        "calib": str(config.calib),
        "clips": {"A": len(utterances[0::2]), "B": len(utterances[1::2])},
        "rows": {h: acc[h].count for h in acc},
        "gram_rel_diff_A_B": float(np.linalg.norm(ha - hb) / np.linalg.norm(hw)),
        # How concentrated G is: its top eigenvalue's share of tr(G), (tr G)^2 / ||G||_F^2.
        "gram_top_eig_share": float(eig[-1] / eig.sum()),
        "gram_effective_rank": float(eig.sum() ** 2 / np.sum(eig**2)),
        "errors": rows,
        "heldout": heldout,
        "seconds": {"decode": decode_s, "quantize": quantize_s,
                    "total": time.perf_counter() - started},
        "cpus": os.cpu_count(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / f"{Path(args.model).name}.grams.npz",
             **{h: acc[h].gram for h in acc},
             counts=np.array([acc[h].count for h in acc]))
    if args.compare_build is not None:
        result["compare_build"] = compare_build(args.compare_build, table, spec, w,
                                                variants["gptq[A+B]"])
    return result


def show(result: dict[str, Any]) -> None:
    headers = ["rounding", "out err G_A", "out err G_B", "out err G_A+B", "weight err"]
    table = [[name, *(f"{r[c]:.5f}" for c in ("out_err_G_A", "out_err_G_B", "out_err_G_A+B",
                                               "weight_err"))]
             for name, r in result["errors"].items()]
    rows = result["rows"]
    print_table(f"{result['model']}: tied table '{result['table']}' "
                f"({result['reader']}, {result['shape'][0]}x{result['shape'][1]}, "
                f"{result['spec']})", headers, table,
                f"A = even clips ({result['clips']['A']}, {rows['A']} rows), B = odd "
                f"({result['clips']['B']}, {rows['B']} rows); out err = tr(E^T G E) / "
                f"tr(W^T G W); ||G_A/n - G_B/n|| / ||G/n|| = "
                f"{result['gram_rel_diff_A_B']:.4f}; G's top eigenvalue: "
                f"{result['gram_top_eig_share']:.3f} of tr G, effective rank "
                f"{result['gram_effective_rank']:.1f}", width=100)
    for name, value in result["heldout"].items():
        print(f"  {name:32s} {value:.5f}")
    if "compare_build" in result:
        print(f"  build's stored table: {result['compare_build']}")
    s = result["seconds"]
    print(f"  decode {s['decode']:.0f} s, quantize {s['quantize']:.0f} s, "
          f"total {s['total']:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="zoo name or export folder (e.g. whisper-tiny.en)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/table_heldout"),
                        help="folder for <model>.json and the Grams, <model>.grams.npz")
    parser.add_argument("--compare-build", type=Path, default=None,
                        help="a GPTQ-tied build folder whose stored table to check")
    parser.add_argument("--show", action="store_true", help="print the saved JSON and exit")
    args = parser.parse_args()
    path = args.out / f"{Path(args.model).name}.json"
    if args.show:
        show(json.loads(path.read_text()))
        return 0
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    show(result)
    print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
