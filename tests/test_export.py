"""ONNX export of whisper-tiny.en: graphs, card, and numerics against PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf

from sfc.card import ModelCard
from sfc.models.zoo import EXPORT_FORMAT
from sfc.runtime.cross import cross_feed
from tests.conftest import EVAL_DATA


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    """Reference log-mel of two real utterances (transformers' extractor, batch of 2)."""
    from transformers import WhisperFeatureExtractor

    audio = [sf.read(EVAL_DATA / "audio" / f"eval_000{i}.flac", dtype="float32")[0]
             for i in (1, 2)]
    return WhisperFeatureExtractor()(audio, sampling_rate=16000,
                                     return_tensors="np").input_features


def test_card_describes_both_graphs(tiny_export: Path) -> None:
    card = ModelCard.load(tiny_export)
    assert card.family == "whisper" and card.objective == "whisper-teacher-forced"
    assert set(card.graphs) == {"encoder", "decoder"}
    dec = card.graphs["decoder"]
    assert [t.name for t in dec.inputs] == ["tokens", "past_key", "past_value",
                                            *(f"cross_key_{i}" for i in range(4)),
                                            *(f"cross_value_{i}" for i in range(4))]
    assert dec.inputs[1].shape == (4, "batch", 6, "past", 64)
    assert dec.inputs[3].shape == ("batch", 6, "positions", 64)
    assert card.graphs["encoder"].inputs[0].shape == ("batch", 80, "frames")
    assert card.source["format"] == EXPORT_FORMAT
    assert card.decoding is not None
    assert card.decoding.prompt == (50257, 50362)  # <|startoftranscript|> <|notimestamps|>
    assert card.decoding.eot == 50256 and card.decoding.timestamp_begin == 50363
    assert card.preprocessing is not None and card.preprocessing["n_mels"] == 80
    assert (tiny_export / card.tokenizer).is_file() if card.tokenizer else False


def test_encoder_and_cached_decoder_match_pytorch(tiny_export: Path, tiny_hf,  # type: ignore[no-untyped-def]
                                                  features: np.ndarray) -> None:
    import torch

    enc = ort.InferenceSession(str(tiny_export / "encoder.onnx"))
    dec = ort.InferenceSession(str(tiny_export / "decoder.onnx"))
    hidden, ck, cv = enc.run(None, {"input_features": features})
    names = {i.name for i in dec.get_inputs()}
    tokens = np.array([[50257, 50362, 383, 4252, 286, 262, 3290],
                       [50257, 50362, 1081, 262, 12823, 11875, 13]])
    with torch.no_grad():
        ref = tiny_hf.model(input_features=torch.from_numpy(features),
                            decoder_input_ids=torch.from_numpy(tokens))
        ref_hidden = tiny_hf.model.model.encoder(torch.from_numpy(features)).last_hidden_state
    assert np.abs(hidden - ref_hidden.numpy()).max() <= 2e-3
    # Prompt first with an empty cache, then one token per step, as the runtime decodes.
    past = np.zeros((4, 2, 6, 0, 64), dtype=np.float32)
    pk, pv = past, past
    chunks = []
    for lo, hi in [(0, 2), *((i, i + 1) for i in range(2, tokens.shape[1]))]:
        logits, pk, pv = dec.run(None, {"tokens": tokens[:, lo:hi], "past_key": pk,
                                        "past_value": pv, **cross_feed(names, ck, cv)})
        chunks.append(logits)
    logits = np.concatenate(chunks, axis=1)
    diff = np.abs(logits - ref.logits.numpy()).max()
    assert diff <= 2e-3, f"logits differ from PyTorch by {diff}"
    assert pk.shape == (4, 2, 6, tokens.shape[1], 64)


def test_encoder_takes_a_shorter_window_as_its_pytorch_module_does(
        tiny_export: Path, tiny_hf, features: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """Format 3: the encoder's frames are not baked in; the first 800 frames give the
    export's PyTorch module's outputs on them (positions 0..399), and a decoder step runs
    on 400 cross-attention positions."""
    import torch

    from sfc.models.whisper_export import _modules

    short = np.ascontiguousarray(features[:1, :, :800])
    enc = ort.InferenceSession(str(tiny_export / "encoder.onnx"))
    got = enc.run(None, {"input_features": short})
    with torch.no_grad():
        want = _modules(tiny_hf)[0](torch.from_numpy(short))
    for a, b in zip(got, want, strict=True):
        assert a.shape == tuple(b.shape)
        assert np.abs(a - b.numpy()).max() <= 2e-3
    assert got[1].shape[3] == 400
    dec = ort.InferenceSession(str(tiny_export / "decoder.onnx"))
    past = np.zeros((4, 1, 6, 0, 64), dtype=np.float32)
    logits, _, _ = dec.run(None, {"tokens": np.array([[50257, 50362]]), "past_key": past,
                                  "past_value": past,
                                  **cross_feed({i.name for i in dec.get_inputs()},
                                               got[1], got[2])})
    assert logits.shape == (1, 2, 51864) and np.isfinite(logits).all()


def _stacked_cross(decoder: onnx.ModelProto, n_layers: int) -> onnx.ModelProto:
    """The decoder as exports before format 2 had it: one stacked cross K and one V input
    [layers, batch, heads, frames, head_dim], a Gather per layer."""
    from onnx import TensorProto, helper

    graph = decoder.graph
    per_layer = [i for i in graph.input if i.name.startswith("cross_")]
    kept = [i for i in graph.input if not i.name.startswith("cross_")]
    gathers = []
    for kind in ("cross_key", "cross_value"):
        kept.append(helper.make_tensor_value_info(kind, TensorProto.FLOAT,
                                                  [n_layers, "batch", 6, 1500, 64]))
        for i in range(n_layers):
            index = helper.make_tensor(f"{kind}_index_{i}", TensorProto.INT64, [], [i])
            graph.initializer.append(index)
            gathers.append(helper.make_node("Gather", [kind, index.name], [f"{kind}_{i}"],
                                            axis=0))
    assert len(per_layer) == 2 * n_layers
    del graph.input[:]
    graph.input.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(gathers + nodes)
    return decoder


def test_older_stacked_cross_decoders_still_run(tiny_export: Path, features: np.ndarray,
                                                tmp_path: Path) -> None:
    """Folders exported before per-layer cross K/V inputs take them stacked: the runtime's
    feed (`cross_feed`) runs both layouts to the same logits."""
    enc = ort.InferenceSession(str(tiny_export / "encoder.onnx"))
    _, ck, cv = enc.run(None, {"input_features": features})
    onnx.save(_stacked_cross(onnx.load(str(tiny_export / "decoder.onnx")), len(ck)),
              str(tmp_path / "stacked.onnx"))
    tokens = np.array([[50257, 50362]] * 2)
    past = np.zeros((4, 2, 6, 0, 64), dtype=np.float32)
    logits = []
    for path in (tiny_export / "decoder.onnx", tmp_path / "stacked.onnx"):
        dec = ort.InferenceSession(str(path))
        names = {i.name for i in dec.get_inputs()}
        assert ("cross_key" in names) == (path.name == "stacked.onnx")
        logits.append(dec.run(["logits"], {"tokens": tokens, "past_key": past,
                                           "past_value": past,
                                           **cross_feed(names, ck, cv)})[0])
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)


def test_a_cached_export_of_an_older_format_is_not_reused(
        tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    from sfc.models import zoo_export_cached

    monkeypatch.setenv("SFC_CACHE", str(tmp_path))
    cached = tmp_path / "exports" / "whisper-tiny.en"
    cached.mkdir(parents=True)
    for name in ("card.json", "tokenizer.json"):
        shutil.copyfile(tiny_export / name, cached / name)
    assert zoo_export_cached("whisper-tiny.en")
    card = json.loads((cached / "card.json").read_text())
    del card["_data"]["source"]["format"]  # as every export before format 2
    (cached / "card.json").write_text(json.dumps(card))
    assert not zoo_export_cached("whisper-tiny.en")


def test_zoo_export_runs_in_its_own_process(tmp_path: Path) -> None:
    """A first use of a zoo name exports in a child process: the caller never loads torch
    (its ~1.1 GB stay out of a build's peak), and the child's peak is recorded."""
    import json
    import os
    import subprocess
    import sys

    code = ("import sys; from sfc.models import model_folder, export_peak_mib; "
            "f = model_folder('whisper-tiny.en'); "
            "print(json.dumps(['torch' in sys.modules, export_peak_mib(f), str(f)]))")
    env = {**os.environ, "SFC_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", "import json; " + code], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    torch_loaded, peak, folder = json.loads(done.stdout.strip().splitlines()[-1])
    assert torch_loaded is False
    assert peak is not None and 300 < peak < 8000  # MiB: torch and the model were loaded
    assert Path(folder) == tmp_path / "cache" / "exports" / "whisper-tiny.en"
    ModelCard.load(Path(folder))
