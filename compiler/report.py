"""The build report: one structure saved as report.json, rendered to report.md from it.

Per graph: quantizer counts, which quantized layers fused into integer kernels (per
layer), what stayed float and why, real bytes; for the model: WER against FP32 with the
paired bootstrap interval (Whisper) or output distortion (other models), build time;
for ESC builds, the search (objective start -> final, evaluations, per-quantizer scale
change against the MSE start, the trace plot).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .atomic import write_json_atomic, write_text_atomic
from .build import ESC_PLOT, ESC_RESULT, GUARD_RESULT, BuildConfig, GraphBuild
from .calib.esc import EscResult, split_key
from .eval.results import RESULT_VERSION, EvalResult
from .eval.wer import paired_bootstrap_delta
from .precision.plots import BITS_PLOT, FRONTIER_PLOT, ONE_STAGE_PLOT, histogram
from .precision.search import RESULT_FILE
from .quant.recipe import Recipe
from .quant.rotate import PREFIX as ROTATION_PREFIX
from .runtime.decoding import LOOP_GUARD
from .targets.base import is_fused_op

__all__ = [
    "BuildReport",
    "Distortion",
    "EscSummary",
    "LayerRow",
    "WerComparison",
    "fp32_eval",
    "layer_rows",
    "make_report",
]

_VERSION = 1


@dataclass(frozen=True)
class LayerRow:
    """One quantized tensor: what it is, how it is quantized, which kernel runs it."""

    graph: str
    tensor: str
    kind: str
    ops: str
    spec: str
    scale: str
    kernel: str


@dataclass(frozen=True)
class WerComparison:
    """WER of the build against FP32 on the same utterances (paired)."""

    data: str
    n: int
    fp32_wer: float
    wer: float
    delta: float
    delta_lo: float
    delta_hi: float
    p_value: float
    lossless: bool  # 0 inside the paired 95% interval
    rtf_fp32: float
    rtf: float
    loop_stops_fp32: int = 0  # windows whose decoding the repetition-loop guard ended
    loop_stops: int = 0
    batch: int = 1  # the build's utterances decoded together (`sfc build --eval-batch`)


@dataclass(frozen=True)
class Distortion:
    """Output distortion of the build against FP32 on the same feeds (models without a
    task metric): relative L2 error and cosine similarity per output, mean over feeds."""

    feeds: int
    rel_l2: dict[str, float]
    cosine: dict[str, float]


@dataclass(frozen=True)
class EscScale:
    """One ESC-tuned quantizer: MSE start scale, final scale, and their ratio."""

    graph: str
    tensor: str
    mse: float
    final: float
    ratio: float


@dataclass(frozen=True)
class EscSummary:
    """What the ESC search did (from esc.json)."""

    objective: str
    start_objective: float
    final_objective: float
    best_objective: float
    final_point: str
    evaluations: int
    budget: int
    seconds: float
    interrupted: bool
    plot: str
    scales: tuple[EscScale, ...]

    @classmethod
    def of(cls, result: EscResult, plot: str) -> EscSummary:
        scales = []
        for key, ratio in result.ratios().items():
            graph, tensor = split_key(key)
            scales.append(EscScale(graph, tensor, result.start[key], result.scales[key], ratio))
        return cls(result.objective, result.start_objective, result.final_objective,
                   result.best_objective, result.final_point, result.evaluations,
                   int(result.config.get("budget", result.evaluations)), result.seconds,
                   result.interrupted, plot, tuple(scales))


@dataclass(frozen=True)
class BuildReport:
    """Everything a build measured."""

    src: str
    config: dict[str, Any]
    graphs: tuple[dict[str, Any], ...]
    layers: tuple[LayerRow, ...]
    fp32_bytes: int
    artifact_bytes: int
    wer: WerComparison | None
    build_s: float
    distortion: Distortion | None = None
    esc: EscSummary | None = None
    precision: dict[str, Any] | None = None  # the mixed search (precision.json)
    guard: dict[str, Any] | None = None  # the activation guard (act_guard.json)
    # The build process's peak resident memory (MiB), its WER check included.
    peak_rss_mib: float | None = None
    # The peak of the separate process that exported the zoo model first (this build
    # made the export; None otherwise).
    export_peak_rss_mib: float | None = None

    @property
    def compression(self) -> float:
        """FP32 bytes over artifact bytes (real files on disk)."""
        return self.fp32_bytes / self.artifact_bytes if self.artifact_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON envelope."""
        data = asdict(self)
        data["compression"] = self.compression
        return {"_type": "BuildReport", "_version": _VERSION, "_data": data}

    def save(self, folder: Path) -> None:
        """Write report.json and report.md atomically."""
        write_json_atomic(Path(folder) / "report.json", self.to_dict())
        write_text_atomic(Path(folder) / "report.md", render_markdown(self))


def layer_rows(graph: str, recipe: Recipe, optimized: onnx.ModelProto) -> list[LayerRow]:
    """Per quantized tensor: its spec, scale, and the kernels of the nodes that read it.

    ORT keeps a fused node's name (a QDQ MatMul becomes a MatMulIntegerToFloat named like
    the MatMul), so a consumer still of a float type after lowering ran in float.
    """
    op_of = {n.name: n.op_type for n in optimized.graph.node}
    rows = []
    for t in recipe.tensors:
        kernels = sorted({op_of.get(c, "absorbed") for c in t.consumers})
        kernel = ", ".join(k if is_fused_op(k) or k == "absorbed" else f"{k} (float)"
                           for k in kernels)
        scale = f"{t.scale:.4g}" if t.scale is not None else t.method
        ops = sorted({c.rsplit("/", 1)[-1].split("_")[0] for c in t.consumers})
        rows.append(LayerRow(graph, t.tensor, t.kind, ",".join(ops), t.spec.describe(), scale,
                             kernel))
    return rows


def fp32_eval(folder: Path, data: Path, limit: int | None,
              run: Any, batch: int = 1) -> EvalResult:
    """The FP32 folder's evaluation on `data` (`batch` utterances decoded together), cached
    beside it.

    The key covers the manifest, the limit, the result format, the decoding rule (the
    loop guard) and the batch, so a changed runtime never reuses a stale evaluation, nor
    one batch size another's timings.
    """
    manifest = data / "manifest.jsonl" if data.is_dir() else data
    # Batch 1 adds nothing: the caches written before batching keep their key.
    batched = f"|batch={batch}" if batch != 1 else ""
    salt = f"{limit}|{RESULT_VERSION}|{LOOP_GUARD!r}{batched}".encode()
    key = hashlib.sha256(manifest.read_bytes() + salt).hexdigest()[:16]
    cache = folder / f"eval-{key}.json"
    if cache.is_file():
        return EvalResult.load(cache)
    result: EvalResult = run()
    result.save(cache)
    return result


def compare_wer(fp32: EvalResult, built: EvalResult, seed: int = 0) -> WerComparison:
    """Paired comparison of two evaluations of the same utterances."""
    ids_a = [u.id for u in fp32.utterances]
    if ids_a != [u.id for u in built.utterances]:
        raise ValueError("the two evaluations cover different utterances")
    ea = np.array([u.errors for u in fp32.utterances])
    eb = np.array([u.errors for u in built.utterances])
    ref = np.array([u.ref_words for u in fp32.utterances])
    d = paired_bootstrap_delta(ea, eb, ref, seed=seed)
    return WerComparison(data=built.data, n=built.n, fp32_wer=fp32.wer, wer=built.wer,
                         delta=d.delta, delta_lo=d.lo, delta_hi=d.hi, p_value=d.p_value,
                         lossless=d.includes_zero, rtf_fp32=fp32.rtf, rtf=built.rtf,
                         loop_stops_fp32=fp32.loop_stops, loop_stops=built.loop_stops,
                         batch=built.batch)


def make_report(src: str, config: BuildConfig, out: Path, graphs: Sequence[GraphBuild],
                wer: WerComparison | None, build_s: float,
                distortion: Distortion | None = None,
                peak_rss_mib: float | None = None,
                export_peak_rss_mib: float | None = None) -> BuildReport:
    """Assemble the report from what the build saved in `out`."""
    layers: list[LayerRow] = []
    for g in graphs:
        recipe = Recipe.load(out / g.recipe)
        # A TensorRT engine is no ONNX graph: its kernels are in model.plan.layers.json, and
        # the per-layer rows read the QDQ graph it was built from.
        lowered = g.lowering.artifact if g.lowering.artifact.endswith(".onnx") else "model.qdq.onnx"
        optimized = onnx.load(str(out / g.name / lowered), load_external_data=False)
        layers += layer_rows(g.name, recipe, optimized)
    cfg = {k: (str(v) if isinstance(v, Path) else
               [str(p) for p in v] if k == "train_data" else v)
           for k, v in asdict(config).items()}
    esc = None
    if config.uses_esc and config.recipe is None and (out / ESC_RESULT).is_file():
        esc = EscSummary.of(EscResult.load(out / ESC_RESULT), ESC_PLOT)
    precision = None
    if config.recipe is None and (out / RESULT_FILE).is_file():
        precision = json.loads((out / RESULT_FILE).read_text())
    guard = None
    if config.recipe is None and (out / GUARD_RESULT).is_file():
        guard = json.loads((out / GUARD_RESULT).read_text())
    return BuildReport(
        src=src,
        config=cfg,
        graphs=tuple(asdict(g) | {"lowering": g.lowering.to_dict()["_data"],
                                  "engine_layers": _engine_layers(out / g.name)}
                     for g in graphs),
        layers=tuple(layers),
        fp32_bytes=sum(g.fp32_bytes for g in graphs),
        artifact_bytes=sum(g.lowering.bytes for g in graphs),
        wer=wer,
        build_s=build_s,
        distortion=distortion,
        esc=esc,
        precision=precision,
        guard=guard,
        peak_rss_mib=peak_rss_mib,
        export_peak_rss_mib=export_peak_rss_mib,
    )


def _engine_layers(folder: Path) -> list[dict[str, Any]]:
    """The TensorRT engine inspector's per-layer table, when the build made an engine."""
    path = folder / "model.plan.layers.json"
    return list(json.loads(path.read_text())) if path.is_file() else []


def render_markdown(report: BuildReport) -> str:
    """report.md, rendered from the report structure only."""
    c = report.config
    acts = f"A{c['activations']}" if c.get("activations") else "A-float"
    lines = [
        f"# sfc build: {report.src} (W{c['weights']}{acts}, "
        f"{c.get('weight_method', 'mse')} weights, {c['calibrator']}, "
        f"target {c['target']})",
        "",
        f"- build time: {report.build_s:.1f} s",
        *([f"- peak resident memory: {report.peak_rss_mib:.0f} MiB (this build process"
           + (", its WER check included)" if report.wer is not None else ")")]
          if report.peak_rss_mib is not None else []),
        *([f"- the zoo export this build made first ran in its own process: "
           f"{report.export_peak_rss_mib:.0f} MiB peak"]
          if report.export_peak_rss_mib is not None else []),
        f"- size: {report.fp32_bytes / 1e6:.1f} MB FP32 -> {report.artifact_bytes / 1e6:.1f} MB "
        f"artifact ({report.compression:.2f}x, real bytes on disk)",
    ]
    w = report.wer
    if w is not None:
        verdict = "lossless (0 inside the paired 95% CI)" if w.lossless else "NOT lossless"
        batched = f", decoded in batches of {w.batch}" if w.batch > 1 else ""
        lines += [
            f"- WER on {w.data} ({w.n} utterances{batched}): FP32 {100 * w.fp32_wer:.2f}% -> "
            f"{100 * w.wer:.2f}%, delta {100 * w.delta:+.2f} points, paired 95% CI "
            f"[{100 * w.delta_lo:+.2f}, {100 * w.delta_hi:+.2f}], p = {w.p_value:.3f}: {verdict}",
            f"- real-time factor: FP32 {w.rtf_fp32:.3f} -> {w.rtf:.3f}",
            f"- repetition loops ended by the decoder's loop guard: FP32 {w.loop_stops_fp32}, "
            f"build {w.loop_stops}",
        ]
    d = report.distortion
    if d is not None:
        for name in sorted(d.rel_l2):
            lines.append(f"- output `{name}` vs FP32 over {d.feeds} feeds: relative L2 "
                         f"{d.rel_l2[name]:.4f}, cosine {d.cosine[name]:.5f}")
    lines += _esc_summary(report.esc)
    lines += _guard(report.guard)
    lines += _precision(report.precision)
    for g in report.graphs:
        low = g["lowering"]
        fused = ", ".join(f"{k} x{v}" for k, v in sorted(low["fused"].items())) or "none"
        weighted = [n for n in low["float_weighted"] if not n.startswith(ROTATION_PREFIX)]
        rotations = len(low["float_weighted"]) - len(weighted)
        lines += ["", f"## {g['name']}", "",
                  f"- quantizers: {g['n_weight_quantizers']} weights, "
                  f"{g['n_activation_quantizers']} activations"
                  + (f" ({g['n_smoothed']} smoothed)" if g.get("n_smoothed") else "")
                  + (f", {g['n_rotated']} MatMul inputs Hadamard-rotated"
                     if g.get("n_rotated") else "")
                  + f"; {g['seconds']:.1f} s",
                  f"- fused integer kernels: {fused}",
                  f"- float weighted ops left: {len(weighted)}"
                  + (f" ({', '.join(weighted[:8])}{', ...' if len(weighted) > 8 else ''})"
                     if weighted else "")
                  + (f", and {rotations} Hadamard rotation MatMuls (32 x 32)"
                     if rotations else ""),
                  f"- artifact: {g['name']}/{low['artifact']} ({low['bytes'] / 1e6:.1f} MB)"]
        lines += [f"- lowering: {note}" for note in low.get("notes", ())]
        if g.get("engine_layers"):
            lines += ["", "| engine layer | type | inputs | outputs | tactic |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['name']} | {r['layer_type']} | {', '.join(r['inputs'])} | "
                      f"{', '.join(r['outputs'])} | {r['tactic']} |"
                      for r in g["engine_layers"]]
        reasons: dict[str, int] = {}
        for s in g["skipped"]:
            key = f"{s.get('op_type', '?')}: {s.get('reason', '')}"
            reasons[key] = reasons.get(key, 0) + 1
        if reasons:
            lines += ["- left float:"] + [f"  - {k} (x{n})" for k, n in sorted(reasons.items())]
    lines += ["", "## Layers", "", "| graph | tensor | kind | op | spec | scale | kernel |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.graph} | `{r.tensor}` | {r.kind} | {r.ops} | {r.spec} | {r.scale} | "
              f"{r.kernel} |" for r in report.layers]
    lines += _esc_table(report.esc)
    return "\n".join(lines) + "\n"


def _precision(p: dict[str, Any] | None) -> list[str]:
    """The mixed search: budget, result, formats histogram, plots, per-layer table."""
    if p is None:
        return []
    cfg = p["config"]
    budget = (f"{cfg['avg_bits']:g} average bits" if cfg["avg_bits"] is not None
              else f"{cfg['size_mb']:g} MB")
    rho = p["spearman_task_vs_proxy"]
    one = cfg.get("method") == "one-stage"
    lines = ["", f"## Mixed precision ({'one' if one else 'two'}-stage)", "",
             f"- budget {budget}; chosen: {p['avg_bits']:.3f} average weight bits (scales "
             f"counted), about {p['est_mb']:.1f} MB of initializers; {p['seconds']:.0f} s"]
    if one:
        o = cfg["one_stage"]
        lines += [f"- bits learned with the weights: {o['steps']} search steps, "
                  f"{o['finetune_steps']} fine-tuning steps with the bits fixed, seed "
                  f"{o['seed']}; candidates {', '.join(cfg['candidates'])}",
                  "- per format below: -log of the learned probability (the integer "
                  "program's cost: the most probable choice within the budget)",
                  "- wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in
                                              p.get("phase_seconds", {}).items()),
                  f"- plots: {BITS_PLOT}, {ONE_STAGE_PLOT}"]
    else:
        lines += [f"- sensitivity: {p['objective']} on {cfg['samples']} calibration items "
                  f"(FP32 {p['fp32_objective']:.4g}); candidates {', '.join(cfg['candidates'])}",
                  "- task probes vs layer-output proxy: Spearman "
                  + (f"{rho:.2f}" if rho is not None else "not measured"),
                  f"- plots: {BITS_PLOT}, {FRONTIER_PLOT}"]
    for i, r in enumerate(p.get("rounds", ())):
        lines.append(f"- check {i + 1}, {r.get('choice', 'program')}: measured "
                     f"{r['measured']:.4g} with all its formats at once vs predicted "
                     f"{r['predicted']:.4g} (sum of single-weight probes), "
                     f"{r['sub4bit_weights']} weights below 4 bits"
                     + (" (kept)" if r.get("kept") else ""))
    lines += ["",
             "| format | layers | parameters |", "|---|---|---|"]
    lines += [f"| {f} | {n} | {params:,} |" for f, n, params in histogram(p)]
    lines += ["", "| graph | weight | read by | params | sensitivity per format | chosen |",
              "|---|---|---|---|---|---|"]
    for c in p["layers"]:
        sens = ", ".join(f"{o['label']}: {o['sensitivity']:.3g}" for o in c["options"])
        readers = ", ".join(c["consumers"])
        lines.append(f"| {c['graph']} | `{c['tensor']}` | {readers} | {c['params']:,} | {sens} | "
                     f"**{c['chosen']}** |")
    return lines


def _guard(a: dict[str, Any] | None) -> list[str]:
    """The activation guard: the KL gap it found and the activations it kept in float."""
    if a is None:
        return []
    cfg = a["config"]
    gap, final = a["quantized"] - a["float"], a["final"] - a["float"]
    lines = ["", "## Activation guard", "",
             f"- KL to FP32 on calibration clips {a['clips'][0] + 1}-{a['clips'][1]}: "
             f"{a['quantized']:.4g} with "
             f"every activation quantized, {a['float']:.4g} with the weights alone; "
             f"activations add {gap:.4g} (allowance {cfg['allowance']:g})"]
    if not a["kept"]:
        return [*lines, "- within the allowance: every activation stays quantized"]
    lines.append(f"- kept in float: {len(a['kept'])} activation(s), adding {final:.4g} after "
                 + ("(allowance met)" if a["met"] else
                    f"(allowance NOT met: at most {cfg['max_float']} are kept)"))
    lines += ["", "| graph | activation kept float | KL after |", "|---|---|---|"]
    lines += [f"| {k['graph']} | `{k['tensor']}` | {k['kl_after']:.4g} |" for k in a["kept"]]
    return lines


def _esc_summary(e: EscSummary | None) -> list[str]:
    if e is None:
        return []
    change = (e.final_objective - e.start_objective) / e.start_objective \
        if e.start_objective else 0.0
    how = {"mean": "mean of the final distribution",
           "best": "best candidate: the final mean scored worse than the start",
           "interrupted": "best so far: interrupted"}.get(e.final_point, e.final_point)
    moved = sorted(e.scales, key=lambda s: -abs(np.log(s.ratio)))[:3]
    return [
        "", "## ESC", "",
        f"- objective {e.objective}: {e.start_objective:.5g} (MSE start) -> "
        f"{e.final_objective:.5g} ({how}), {100 * change:+.1f}%; best candidate "
        f"{e.best_objective:.5g}",
        f"- {e.evaluations} evaluations (budget {e.budget}) in {e.seconds:.1f} s; "
        f"{len(e.scales)} scales tuned; plot: {e.plot}",
        "- largest scale changes vs MSE: "
        + ", ".join(f"{s.graph} `{s.tensor}` x{s.ratio:.3g}" for s in moved),
    ]


def _esc_table(e: EscSummary | None) -> list[str]:
    if e is None:
        return []
    lines = ["", "## ESC scales", "", "| graph | tensor | MSE scale | ESC scale | ratio |",
             "|---|---|---|---|---|"]
    lines += [f"| {s.graph} | `{s.tensor}` | {s.mse:.4g} | {s.final:.4g} | {s.ratio:.4f} |"
              for s in e.scales]
    return lines
