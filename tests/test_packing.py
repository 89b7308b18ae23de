"""Calibration clips packed into Whisper windows for ESC's objective."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sfc.build import BuildConfig, _objective_clips
from sfc.calib.packing import GAP_S, clips_digest, pack_clips, packed_audio
from sfc.errors import SfcError
from sfc.eval.manifest import Utterance
from sfc.runtime.audio import SAMPLE_RATE


def _clips(folder: Path, seconds: list[float]) -> list[Utterance]:
    rng = np.random.default_rng(0)
    out = []
    for i, s in enumerate(seconds):
        path = folder / f"c{i}.wav"
        sf.write(path, (0.1 * rng.standard_normal(round(s * SAMPLE_RATE))).astype(np.float32),
                 SAMPLE_RATE, subtype="FLOAT")
        out.append(Utterance(id=f"c{i}", audio=path, text="x"))
    return out


def test_clips_join_in_order_with_a_pause_and_never_overfill_a_window(tmp_path: Path) -> None:
    clips = _clips(tmp_path, [10, 10, 9, 29.5, 3])
    packed = pack_clips(clips)
    # 10 + 0.5 + 10 fits 28 s, + 9 would not; 29.5 s alone; then 3 s.
    assert [p.parts for p in packed] == [("c0", "c1"), ("c2",), ("c3",), ("c4",)]
    assert packed[0].id == "c0+c1"
    gap = round(GAP_S * SAMPLE_RATE)
    a, b = (sf.read(c.audio, dtype="float32")[0] for c in clips[:2])
    np.testing.assert_array_equal(packed[0].samples,
                                  np.concatenate([a, np.zeros(gap, np.float32), b]))
    assert len(packed[3].samples) == 3 * SAMPLE_RATE
    assert packed_audio(0, packed[0]) is packed[0].samples


def test_packing_is_deterministic_and_its_digest_tracks_the_layout(tmp_path: Path) -> None:
    clips = _clips(tmp_path, [4, 5, 6])
    once, again = pack_clips(clips), pack_clips(clips)
    assert [c.digest for c in once] == [c.digest for c in again]
    assert clips_digest(once) == clips_digest(again)
    assert clips_digest(pack_clips(clips, gap_s=0.25)) != clips_digest(once)
    assert clips_digest(pack_clips(clips, fill_s=8.0)) != clips_digest(once)
    assert [c.parts for c in pack_clips(clips, fill_s=8.0)] == [("c0",), ("c1",), ("c2",)]


def test_build_packs_the_objective_clips_unless_asked_not_to(tmp_path: Path) -> None:
    clips = _clips(tmp_path, [4, 5])
    scored, audio = _objective_clips(clips, BuildConfig())
    assert [c.parts for c in scored] == [("c0", "c1")] and audio is packed_audio
    assert BuildConfig().recipe_config()["calibration"]["packed_clips"] == {
        "fill_s": 28.0, "gap_s": GAP_S}
    plain = BuildConfig(pack_clips=False)
    assert _objective_clips(clips, plain) == (clips, None)
    assert "packed_clips" not in plain.recipe_config()["calibration"]
    # Without ESC the option has nothing to act on (the guard scores one clip a window).
    for other in ({"activations": None}, {"calibrator": "mse"}):
        with pytest.raises(SfcError, match="--no-pack-clips applies to --calibrator esc"):
            BuildConfig(pack_clips=False, **other)  # type: ignore[arg-type]
        assert "packed_clips" not in BuildConfig(**other).recipe_config()["calibration"]
