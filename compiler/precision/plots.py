"""The mixed-precision search's pictures: bits per layer, and the predicted frontier
(summed sensitivity of the cheapest choice at each size, from the same integer program)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import SfcError
from .budget import WeightOption
from .solve import solve_choice

__all__ = ["BITS_PLOT", "FRONTIER_PLOT", "ONE_STAGE_PLOT", "frontier", "histogram",
           "plot_one_stage", "plot_search"]

BITS_PLOT = "plots/bits.png"
FRONTIER_PLOT = "plots/precision_frontier.png"
ONE_STAGE_PLOT = "plots/onestage.png"


def histogram(result: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(format, layers, parameters) for each format chosen, most bits first."""
    layers: Counter[str] = Counter()
    params: Counter[str] = Counter()
    for layer in result["layers"]:
        layers[layer["chosen"]] += 1
        params[layer["chosen"]] += int(layer["params"])

    def order(label: str) -> tuple[int, int]:
        bits, _, block = label.partition("/")
        return (-int(bits) if bits.isdigit() else -32, int(block or 0))

    return [(k, layers[k], params[k]) for k in sorted(layers, key=order)]


def frontier(result: dict[str, Any], points: int = 13) -> list[tuple[float, float, float]]:
    """(average bits, MB, summed sensitivity) of the program's optimum at evenly spaced
    average-bit budgets between the smallest and the largest choice."""
    options = {f"{c['graph']}:{c['tensor']}": [WeightOption(None, int(o["bits"]),
                                                            float(o["sensitivity"]))
                                               for o in c["options"]]
               for c in result["layers"]}
    params = int(result["params"])
    fixed = int(result.get("float_bits", 0))
    lo = sum(min(o.bits for o in v) for v in options.values())
    hi = sum(max(o.bits for o in v) for v in options.values())
    out = []
    for allowed in np.linspace(lo, hi, points):
        try:
            pick = solve_choice(options, float(allowed))
        except SfcError:
            continue
        bits = sum(options[k][i].bits for k, i in pick.items()) + fixed
        loss = sum(options[k][i].sensitivity for k, i in pick.items())
        out.append((bits / params, (result["other_bytes"] + bits / 8) / 1e6, loss))
    return out


def plot_search(result: dict[str, Any], folder: Path, with_frontier: bool = True) -> None:
    """Write BITS_PLOT and (two-stage) FRONTIER_PLOT under `folder` (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = histogram(result)
    ax.bar([r[0] for r in rows], [r[2] / 1e6 for r in rows], color="C0")
    for i, r in enumerate(rows):
        ax.text(i, r[2] / 1e6, f"{r[1]} layers", ha="center", va="bottom", fontsize="small")
    ax.set_xlabel("format (bits/block)")
    ax.set_ylabel("parameters (M)")
    ax.set_title(f"chosen formats: {result['avg_bits']:.3f} average bits")
    fig.tight_layout()
    _save(fig, Path(folder) / BITS_PLOT)
    if not with_frontier:
        return

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pts = frontier(result)
    ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", color="C0",
            label="program optimum per budget")
    est = (result["other_bytes"] + result["bits_used"] / 8) / 1e6
    chosen = sum(next(o["sensitivity"] for o in c["options"] if o["label"] == c["chosen"])
                 for c in result["layers"])
    ax.plot([est], [chosen], "*", color="C3", markersize=14, label="this build")
    ax.set_yscale("symlog", linthresh=max(1e-6, min((abs(p[2]) for p in pts if p[2]),
                                                    default=1e-6)))
    ax.set_xlabel("estimated size (MB, each tensor once)")
    ax.set_ylabel(f"summed sensitivity ({result['objective']})")
    ax.set_title("predicted size / loss frontier (additive probes; WER is measured "
                 "by eval)", fontsize="small")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, Path(folder) / FRONTIER_PLOT)


def plot_one_stage(result: dict[str, Any], budget_bits: float, folder: Path) -> None:
    """ONE_STAGE_PLOT: the search's loss and expected average bits per step, and each
    candidate format's probability averaged over the searched weights."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = result["history"]
    fig = Figure(figsize=(7, 6), dpi=110)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    steps = [h["step"] for h in history]
    top.plot(steps, [h["expected_bits"] for h in history], color="C0",
             label="expected average bits")
    top.axhline(budget_bits, color="C3", linestyle="--", label="budget")
    top.set_ylabel("average bits")
    loss_ax = top.twinx()
    loss_ax.plot(steps, [h["loss"] for h in history], color="C1", alpha=0.5)
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("KL to FP32 (orange)")
    top.legend(fontsize="small", loc="upper right")
    searched = [h for h in history if h.get("probs")]
    labels = sorted({lab for labs in result["labels"].values() for lab in labs})
    for label in labels:
        mean = []
        for h in searched:
            vals = [p[labs.index(label)] for w, p in h["probs"].items()
                    if label in (labs := result["labels"][w])]
            mean.append(sum(vals) / len(vals))
        bottom.plot([h["step"] for h in searched], mean, label=label)
    bottom.set_xlabel("step (fine-tuning with the bits fixed after the last probability)")
    bottom.set_ylabel("mean probability")
    bottom.legend(fontsize="small", title="format")
    fig.tight_layout()
    _save(fig, Path(folder) / ONE_STAGE_PLOT)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
