"""A second evaluation set that no build has seen: new sentences, a voice not in calibration_data.

Issue 15 (item 5) asks whether "lossless" holds beyond `calibration_data/eval`, whose
voices (piper-joe, festival-slt-hts, kokoro-jm_kumo) and sentence pool the calibration set
shares. This script renders `benchmarks/heldout_texts.txt` (sentences written for this
set, 6-17 words, seven domains) with **hibari**'s `heart` voice: an American female neural
voice distilled from Kokoro-82M's af_heart, shipped inside the `hibari-tts` wheel
(Apache-2.0, 0.2.1; `pip install -e ".[heldout]"`, needs only numpy and onnxruntime). No clip of
calibration_data uses it.

Before rendering, every sentence is checked, with `sfc synth`'s normalisation, against the
calibration and evaluation manifests, `calibration_data/synth/texts.txt` and (when present)
the shared speech sets: a clash is an error.

Rendering is deterministic on one machine (another CPU class may round ONNX Runtime's float
kernels differently, so pair a build's evaluation with an FP32 one on the same render):
each sentence's speaking rate (0.9-1.1) and condition come from `--seed`; hibari's noise
component is seeded by (seed, index). 40% of the clips stay clean;
the rest get `sfc.calib.augment.augment` (seeded speed, room reverberation, 10-30 dB white
noise), condition `augmented`. Audio is 16 kHz mono 16-bit FLAC in a manifest folder that
`sfc eval --data` reads, written under a staging name and renamed whole; it is never kept
in git. A folder that already holds a manifest is left as it is.

    python benchmarks/heldout_set.py [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sfc.atomic import staging_dir
from sfc.calib.augment import augment
from sfc.calib.synth import held_out_clash, read_texts
from sfc.eval.manifest import MANIFEST_NAME
from sfc.eval.normalize import normalize_text

REPO = Path(__file__).resolve().parents[1]
TEXTS = Path(__file__).with_name("heldout_texts.txt")
VOICE = "hibari-heart"
RATE = 16000
SPEEDS = (0.9, 1.1)
CLEAN_SHARE = 0.4
# Every sentence source the builds or the first evaluation set draw from.
MANIFESTS = (REPO / "calibration_data" / "calib", REPO / "calibration_data" / "eval",
             REPO.parent / "shared" / "datasets" / "speech-calib",
             REPO.parent / "shared" / "datasets" / "speech-eval")
TEXT_FILES = (REPO / "calibration_data" / "synth" / "texts.txt",)


def default_out() -> Path:
    """`$SFC_CACHE/heldout` when SFC_CACHE is set, else /tmp/sfc-heldout (never in git)."""
    cache = os.environ.get("SFC_CACHE")
    return Path(cache) / "heldout" if cache else Path("/tmp/sfc-heldout")


def clash(texts: Sequence[str], manifests: Sequence[Path],
          text_files: Sequence[Path]) -> str | None:
    """The first text that, normalised, is a sentence of a manifest or text file."""
    hit = held_out_clash(texts, [m for m in manifests if (m / MANIFEST_NAME).is_file()])
    if hit is not None:
        return hit
    known = {normalize_text(t) for f in text_files for t in read_texts(f)}
    return next((t for t in texts if normalize_text(t) in known), None)


def render(texts: Sequence[str], out: Path, seed: int) -> Path:
    """Render `texts` with hibari's heart voice into the manifest folder `out`."""
    import soundfile as sf
    from hibari import SAMPLE_RATE, Hibari
    from scipy.signal import resample_poly

    tts = Hibari(threads=1)  # one thread: the same samples on every machine run
    rng = np.random.default_rng(seed)
    speeds = rng.uniform(*SPEEDS, size=len(texts))
    clean = rng.random(len(texts)) < CLEAN_SHARE
    gcd = np.gcd(SAMPLE_RATE, RATE)
    rows = []
    with staging_dir(out) as stage:
        (stage / "audio").mkdir()
        for i, text in enumerate(texts):
            audio = tts(text, speed=float(speeds[i]), seed=[seed, i])
            audio = resample_poly(audio, RATE // gcd, SAMPLE_RATE // gcd).astype(np.float32)
            if not clean[i]:
                audio = augment(audio, (seed, i), RATE)
            name = f"audio/heldout_{i + 1:04d}.flac"
            sf.write(stage / name, np.clip(audio, -1, 1), RATE, subtype="PCM_16")
            rows.append({"audio": name, "text": text, "voice": VOICE,
                         "condition": "clean" if clean[i] else "augmented",
                         "duration_s": round(len(audio) / RATE, 3), "id": f"heldout_{i + 1:04d}",
                         "speed": round(float(speeds[i]), 4), "seed": seed})
        (stage / MANIFEST_NAME).write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=Path, default=TEXTS)
    parser.add_argument("--out", type=Path, default=None,
                        help="manifest folder (default $SFC_CACHE/heldout or /tmp/sfc-heldout)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = (args.out or default_out()).resolve()
    if out.is_relative_to(REPO):
        parser.error(f"--out {out} is inside the repository; the audio must not land in git")
    if (out / MANIFEST_NAME).is_file():
        print(f"{out} already holds a manifest; left as it is")
        return 0
    texts = read_texts(args.texts)
    hit = clash(texts, MANIFESTS, TEXT_FILES)
    if hit is not None:
        sys.exit(f"the sentence {hit!r} is already in a calibration or evaluation source")
    render(texts, out, args.seed)
    print(f"{len(texts)} clips written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
