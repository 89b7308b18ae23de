"""A calibration manifest folder: the bundled clips plus seeded augmented copies of each.

    python benchmarks/augmented_calib.py OUT [--copies 1] [--seed 0] [--calib FOLDER]

writes OUT/manifest.jsonl (the originals by absolute path, then each copy) and
OUT/audio/aug<copy>_<id>.flac, for `sfc build --calib OUT` or `lowbit_table.py --calib OUT`.
Copy c of clip i is `sfc.calib.augment.augment(audio, (seed, c + 1, i))`: speed 0.9/1/1.1x,
reverberation half the time, white noise at 10-30 dB SNR, the perturbations one-stage
training draws (BENCHMARKS.md, issue 10: GPTQ's Gram on degraded copies). The same
arguments give the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import soundfile as sf

from sfc.calib.augment import augment
from sfc.paths import BUNDLED_DATA
from sfc.runtime.audio import SAMPLE_RATE, load_audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=Path, default=BUNDLED_DATA / "calib")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.calib / "manifest.jsonl").read_text().splitlines()
            if line.strip()]
    (args.out / "audio").mkdir(parents=True, exist_ok=True)
    out = [{**r, "audio": str((args.calib / r["audio"]).resolve())} for r in rows]
    for copy in range(args.copies):
        for i, r in enumerate(rows):
            audio = augment(load_audio(args.calib / r["audio"]), (args.seed, copy + 1, i))
            path = args.out / "audio" / f"aug{copy + 1}_{r['id']}.flac"
            sf.write(path, audio, SAMPLE_RATE)
            out.append({**r, "id": f"aug{copy + 1}_{r['id']}", "audio": str(path.resolve()),
                        "condition": f"{r.get('condition', '')}+aug"})
    (args.out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"{len(out)} clips in {args.out / 'manifest.jsonl'}")


if __name__ == "__main__":
    main()
