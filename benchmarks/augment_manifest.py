"""A perturbed copy of a manifest folder: each clip once through `sfc.calib.augment` (speed,
synthetic reverberation, noise) with seed (SEED, clip index), as a second calibration set.

    python benchmarks/augment_manifest.py SRC OUT [--seed 1]

The twenty-seventh session's second calibration set for the rotation check (BENCHMARKS.md,
issue 10) is `sfc synth -o SYNTH` (117 sentences in no eval manifest) then this with the
default seed. Texts are kept (the teacher relabels for training; calibration reads audio).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import soundfile as sf

from sfc.calib.augment import augment
from sfc.eval.manifest import read_manifest

RATE = 16000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder")
    read_manifest(args.src)  # a bad manifest fails before anything is written
    (args.out / "audio").mkdir(parents=True)
    rows = []
    lines = (args.src / "manifest.jsonl").read_text().splitlines()
    for i, line in enumerate(x for x in lines if x.strip()):
        row = json.loads(line)
        audio, rate = sf.read(args.src / row["audio"], dtype="float32")
        if rate != RATE or audio.ndim != 1:
            raise SystemExit(f"{row['audio']}: not 16 kHz mono")
        perturbed = augment(audio, (args.seed, i))
        name = f"audio/aug_{i + 1:04d}.flac"
        sf.write(args.out / name, perturbed, RATE)
        rows.append({**row, "audio": name, "id": f"aug_{i + 1:04d}", "source": row["audio"],
                     "augment_seed": [args.seed, i], "condition": "augmented",
                     "duration_s": round(len(perturbed) / RATE, 3)})
    (args.out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{args.out}: {len(rows)} clips, {sum(r['duration_s'] for r in rows):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
