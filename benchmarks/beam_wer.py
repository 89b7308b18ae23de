"""WER and time per clip of greedy decoding, beam search and temperature fallback.

Run from the repository root::

    python benchmarks/beam_wer.py                                  # all 350 eval clips
    python benchmarks/beam_wer.py --limit 100 --sfc-build w8a8=build --faster-whisper

Variants, for whisper-tiny.en without timestamps on the first ``--limit`` utterances of an
evaluation manifest (0: all), each through `sfc.eval.evaluate` (Whisper's English
normalisation, corpus WER, 95% bootstrap interval):

* ``sfc-LABEL-greedy``   `WhisperRuntime` as shipped (greedy, the loop guard on);
* ``sfc-LABEL-beamN``    ``--beam-size N`` (``--beams``, default 5);
* ``sfc-LABEL-beamN-fb`` the same with ``--temperature-fallback`` (``--seed``);

LABEL ``fp32`` is the FP32 zoo export (``--no-fp32``: left out), others come from
``--sfc-build LABEL=FOLDER``. With ``--faster-whisper``, faster-whisper int8 (CTranslate2)
at beam size 1 and each N, with sfc's rule otherwise (no timestamps, no conditioning on
previous text, temperature 0 only, no fallback): ``fw-int8-beam1``, ``fw-int8-beamN``.

The WER differences are each variant minus its model's greedy one (paired bootstrap over
utterances, `paired_bootstrap_delta`). Times are the mean compute seconds per clip, the
variants run one after another in this process on ``--threads`` threads (default 1): on a
shared machine they drift, so compare them as rough ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    faster_whisper_model,
    faster_whisper_transcriber,
    machine_info,
    machine_line,
    print_table,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "calibration_data" / "eval"
RESULTS = REPO / "benchmarks" / "results"
MODEL = "whisper-tiny.en"


def _parse_build(spec: str) -> tuple[str, Path]:
    label, sep, folder = spec.partition("=")
    if not sep or not (Path(folder) / "card.json").is_file():
        raise argparse.ArgumentTypeError(f"expected LABEL=FOLDER with a card.json: {spec!r}")
    return label, Path(folder).resolve()


def _sfc(folder: Path, threads: int, options: Any) -> Callable[[np.ndarray], Any]:
    from sfc.runtime.whisper import WhisperRuntime

    runtime = WhisperRuntime.open(folder, threads=threads, options=options)
    return runtime.transcribe


def _faster_whisper(threads: int, beam: int) -> Callable[[np.ndarray], str]:
    return faster_whisper_transcriber(faster_whisper_model("int8", threads), beam)


def variants(args: argparse.Namespace) -> list[tuple[str, str, Callable[[], Any]]]:
    """(name, greedy variant it is compared with, loader) of every variant, in run order."""
    from sfc.models import model_folder
    from sfc.runtime.fallback import DecodeOptions

    out: list[tuple[str, str, Callable[[], Any]]] = []
    fp32 = [] if args.no_fp32 else [("fp32", model_folder(MODEL))]
    for label, folder in [*fp32, *args.sfc_build]:
        base = f"sfc-{label}-greedy"
        out.append((base, base, lambda f=folder: _sfc(f, args.threads, DecodeOptions())))
        for n in args.beams:
            out.append((f"sfc-{label}-beam{n}", base, lambda f=folder, n=n: _sfc(
                f, args.threads, DecodeOptions(beam_size=n))))
            out.append((f"sfc-{label}-beam{n}-fb", base, lambda f=folder, n=n: _sfc(
                f, args.threads, DecodeOptions(beam_size=n, fallback=True, seed=args.seed))))
    if args.faster_whisper:
        for n in (1, *args.beams):
            out.append((f"fw-int8-beam{n}", "fw-int8-beam1",
                        lambda n=n: _faster_whisper(args.threads, n)))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sfc.eval import evaluate, read_manifest
    from sfc.eval.wer import paired_bootstrap_delta

    utterances = read_manifest(args.data)
    if args.limit:
        utterances = utterances[:args.limit]
    results: dict[str, Any] = {}
    for name, base, load in variants(args):
        result = evaluate(load(), utterances, model=name, data=str(args.data), seed=0,
                          progress=False)
        errors = [u.errors for u in result.utterances]
        ref_words = [u.ref_words for u in result.utterances]
        delta = paired_bootstrap_delta(results[base]["errors"], errors, ref_words) \
            if base != name else None
        results[name] = {
            "wer": result.wer, "ci": [result.ci_lo, result.ci_hi],
            "s_per_clip": result.compute_s / result.n, "rtf": result.rtf,
            "loop_stops": result.loop_stops, "errors": errors,
            "hypotheses": [u.hypothesis for u in result.utterances],
            "delta_vs_greedy": None if delta is None else
            {"delta": delta.delta, "lo": delta.lo, "hi": delta.hi, "p": delta.p_value},
        }
        print(f"{name}: WER {100 * result.wer:.2f}% "
              f"({result.compute_s / result.n:.3f} s/clip)", file=sys.stderr, flush=True)
    return {"machine": machine_info(args.threads), "command": sys.argv, "n": len(utterances),
            "data": str(args.data), "seed": args.seed, "variants": results}


def show(report: dict[str, Any]) -> None:
    rows = []
    for name, r in report["variants"].items():
        d = r["delta_vs_greedy"]
        rows.append([name, f"{100 * r['wer']:.2f}",
                     f"{100 * r['ci'][0]:.2f}-{100 * r['ci'][1]:.2f}",
                     "-" if d is None else
                     f"{100 * d['delta']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]",
                     f"{r['s_per_clip']:.3f}", str(r["loop_stops"])])
    print_table(f"greedy vs beam search on {report['n']} clips of {report['data']}",
                ["variant", "WER %", "95% CI", "vs greedy (pp, 95% CI)", "s/clip",
                 "loop stops"], rows, caption=machine_line(report["machine"]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Eval manifest")
    parser.add_argument("--limit", type=int, default=0, help="First N utterances (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="Threads per engine")
    parser.add_argument("--beams", type=lambda s: [int(n) for n in s.split(",")],
                        default=[5], help="Beam sizes besides greedy (comma-separated)")
    parser.add_argument("--seed", type=int, default=0, help="Temperature fallback seed")
    parser.add_argument("--sfc-build", type=_parse_build, action="append", default=[],
                        help="LABEL=FOLDER: also an sfc build (repeatable)")
    parser.add_argument("--no-fp32", action="store_true",
                        help="Leave out the FP32 export (only the --sfc-build folders)")
    parser.add_argument("--faster-whisper", action="store_true",
                        help="Also faster-whisper int8 at beam 1 and each --beams")
    parser.add_argument("--json", type=Path, default=RESULTS / "beam_wer.json")
    parser.add_argument("--show", action="store_true", help="Print the saved --json report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.show:
        report = run(args)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    show(json.loads(args.json.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
