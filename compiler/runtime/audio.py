"""Audio loading for the runtime: any soundfile-readable file to float32 mono at 16 kHz.

Everything a user can get wrong about an input file (missing, not audio, empty, silent)
surfaces here as a one-line `SfcError`, so later stages can assume clean samples. The path
`-` reads one file's bytes from standard input.
"""

from __future__ import annotations

import io
import math
import sys
from math import gcd
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from ..errors import SfcError

SAMPLE_RATE = 16000

# The path that stands for standard input, as in most Unix tools.
STDIN = "-"

# Sample rates a file may declare. Real recordings lie well inside (8 kHz telephone to
# 384 kHz studio); outside, a corrupt or hostile header would make the polyphase filter's
# design (taps proportional to rate / gcd(rate, 16000)) take seconds to hours, or the
# output (16 kHz / rate per frame) billions of samples.
MIN_RATE, MAX_RATE = 1000, 384000

# Samples read from a file at a time (4 MB of float32), whatever its header claims.
_BLOCK_SAMPLES = 1 << 20

# Peaks below -70 dBFS carry no speech worth decoding; models hallucinate on them instead.
SILENCE_DBFS = -70.0
_SILENCE_PEAK = 10.0 ** (SILENCE_DBFS / 20.0)


def _one_line(text: str) -> str:
    """Collapse an exception message to a single line (libsndfile messages can span several)."""
    return " ".join(text.split()) or "unknown error"


def check_audio(samples: np.ndarray, name: str) -> np.ndarray:
    """Validate already-loaded samples and return them as float32 mono in [-1, 1].

    `samples` is 1-D, or 2-D laid out as soundfile returns it, (frames, channels); channels
    are averaged. Integer PCM is scaled to [-1, 1); float samples beyond full scale are
    clipped. `name` identifies the source in error messages (usually the file path).

    Raises:
        SfcError: the array has more than 2 dimensions, no samples, non-finite samples,
            or a peak below -70 dBFS.
    """
    arr = np.asarray(samples)
    if arr.ndim not in (1, 2):
        raise SfcError(
            f"{name} has audio of shape {arr.shape}; expected 1-D mono or 2-D (frames, channels)"
        )
    if np.issubdtype(arr.dtype, np.integer):
        # Full-scale integer PCM maps to [-1, 1) like soundfile's float output.
        arr = arr.astype(np.float64) / float(2 ** (np.iinfo(arr.dtype).bits - 1))
    elif not np.issubdtype(arr.dtype, np.floating):
        raise SfcError(f"{name} has audio samples of dtype {arr.dtype}; expected float or int")
    if arr.size == 0:
        raise SfcError(f"{name} is empty (0 samples); nothing to transcribe")
    if not np.all(np.isfinite(arr)):
        raise SfcError(f"{name} contains non-finite samples (NaN or inf); the file is corrupt")
    # Mixed in float64 (float32 channels near its limit sum to inf, and +inf + -inf to NaN),
    # then clipped: float files may exceed full scale, and OpenAI's loader (ffmpeg to
    # 16-bit PCM) clips them the same way.
    mono = arr.mean(axis=1, dtype=np.float64) if arr.ndim == 2 else arr
    mono = np.clip(mono, -1.0, 1.0).astype(np.float32)
    peak = float(np.max(np.abs(mono)))
    if peak < _SILENCE_PEAK:
        peak_db = "-inf" if peak == 0.0 else f"{20.0 * math.log10(peak):.1f}"
        raise SfcError(f"{name} is silent (peak {peak_db} dBFS); nothing to transcribe")
    return mono


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample float mono samples with a polyphase filter; returns float32."""
    if orig_rate == new_rate:
        return np.ascontiguousarray(samples, dtype=np.float32)
    g = gcd(orig_rate, new_rate)
    out = resample_poly(samples.astype(np.float64), new_rate // g, orig_rate // g)
    # The anti-aliasing filter can overshoot full scale slightly; keep the [-1, 1] contract.
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono samples in [-1, 1] at `sample_rate` Hz.

    Multi-channel audio is averaged to mono; other sample rates are resampled. `path`
    `-` (`STDIN`) reads one audio file's bytes from standard input, in any format
    soundfile reads.

    Raises:
        SfcError: the path is missing or a directory, standard input is a terminal or
            empty, soundfile cannot decode it, its sample rate is outside MIN_RATE to
            MAX_RATE, or the audio is empty, non-finite or silent.
    """
    if str(path) == STDIN:
        return _decode(io.BytesIO(_read_stdin()), "stdin", sample_rate)
    p = Path(path)
    if not p.exists():
        raise SfcError(f"{p} does not exist")
    if p.is_dir():
        raise SfcError(f"{p} is a directory, not an audio file")
    return _decode(str(p), str(p), sample_rate)


def _read_stdin() -> bytes:
    """All of standard input's bytes; refuses a terminal, where nobody would pipe audio."""
    if sys.stdin is None or sys.stdin.isatty():
        raise SfcError("- reads audio from stdin, but stdin is a terminal; pipe an audio "
                       "file in")
    data = sys.stdin.buffer.read()
    if not data:
        raise SfcError("stdin is empty (0 bytes); pipe an audio file in")
    return data


def _read_mono(f: sf.SoundFile) -> np.ndarray:
    """Every frame of `f`, channels averaged (in float64, see `check_audio`), as float32.

    Read in blocks of at most `_BLOCK_SAMPLES` until a short read: a header's frame count
    may claim billions of frames that are not there, and soundfile would allocate them all
    up front. Mixing each block as it comes also keeps one channel, not all, in memory.
    """
    step = max(1, _BLOCK_SAMPLES // f.channels)
    parts = []
    while True:
        block = f.read(frames=step, dtype="float32", always_2d=True)
        with np.errstate(invalid="ignore"):  # inf - inf: a NaN `check_audio` reports
            parts.append(block.mean(axis=1, dtype=np.float64).astype(np.float32))
        if len(block) < step:
            return np.concatenate(parts)


def _decode(source: str | BinaryIO, name: str, sample_rate: int) -> np.ndarray:
    """Decode `source` (a path or a file object) with soundfile; `name` is for errors."""
    try:
        with sf.SoundFile(source) as f:
            rate = int(f.samplerate)
            if not MIN_RATE <= rate <= MAX_RATE:  # before reading a body it would not use
                raise SfcError(f"{name} declares a sample rate of {rate} Hz; sfc reads "
                               f"{MIN_RATE} to {MAX_RATE} Hz")
            data = _read_mono(f)
    except (RuntimeError, ValueError) as err:  # LibsndfileError is a RuntimeError
        # libsndfile's own message repeats the path; its error_string is the short reason.
        reason = _one_line(getattr(err, "error_string", None) or str(err))
        raise SfcError(f"{name} is not an audio file sfc can read ({reason})") from err
    mono = check_audio(data, name)
    return resample(mono, rate, sample_rate)
