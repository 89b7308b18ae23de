"""A calibration manifest folder of packed windows: the bundled clips joined, with
half-second pauses, into windows of at most 28 s (`sfc.calib.packing`, as ESC scores them).

    python benchmarks/packed_calib.py OUT [--calib FOLDER]

writes OUT/manifest.jsonl and OUT/audio/packNNN.flac (each window's reference: its clips'
texts joined), for `lowbit_table.py --calib OUT` (BENCHMARKS.md, issue 10: the encoder's
padded frames in GPTQ's Gram matrices). Nothing is random: the same clips pack the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import soundfile as sf

from sfc.calib.packing import pack_clips
from sfc.eval.manifest import read_manifest
from sfc.paths import BUNDLED_DATA
from sfc.runtime.audio import SAMPLE_RATE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--calib", type=Path, default=BUNDLED_DATA / "calib")
    args = parser.parse_args()
    utterances = read_manifest(args.calib)
    texts = {u.id: u.text for u in utterances}
    (args.out / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, clip in enumerate(pack_clips(utterances)):
        path = args.out / "audio" / f"pack{i:03d}.flac"
        sf.write(path, clip.samples, SAMPLE_RATE)
        rows.append({"id": f"pack{i:03d}", "audio": str(path.resolve()),
                     "text": " ".join(texts[part] for part in clip.parts),
                     "condition": "packed", "duration_s": len(clip.samples) / SAMPLE_RATE})
    (args.out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} windows, {sum(r['duration_s'] for r in rows):.1f} s, in "
          f"{args.out / 'manifest.jsonl'}")


if __name__ == "__main__":
    main()
