"""Small valid inputs for each fuzz target: the atheris seed corpus (`cd tests && python -m
fuzz.seeds` rewrites `tests/fuzz/corpus/<target>/`) and the starting points the hypothesis
tests mutate."""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import soundfile as sf
from onnx import TensorProto, helper, numpy_helper

from sfc.card import GraphSpec, ModelCard, WhisperDecoding
from sfc.models.onnx_source import export_onnx_file
from sfc.quant import QuantSpec, Recipe, Skipped, TensorRecipe
from sfc.runtime.features import LogMelSpec

from .contract import EXTERNAL_DATA, EXTERNAL_FILE

CORPUS = Path(__file__).parent / "corpus"
K, N = 16, 4


def tone(rate: int, frames: int, channels: int) -> np.ndarray:
    """A 440 Hz tone at half scale, starting at its peak, one phase offset per channel:
    (frames, channels)."""
    t = np.arange(frames)[:, None] / rate + np.arange(channels)[None, :] * 1e-4
    return (0.5 * np.cos(2 * np.pi * 440.0 * t)).astype(np.float32)


def audio_bytes(samples: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    """`samples` (frames, channels) written as a `fmt` file ("WAV", "FLAC") in memory."""
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def audio_seeds() -> dict[str, bytes]:
    """WAV and FLAC, 1 to 8 channels, 8 kHz to 192 kHz, integer and float samples,
    one with NaNs, one with no frames and one cut short."""
    nan = tone(16000, 160, 1)
    nan[40:50] = np.nan
    pcm = audio_bytes(tone(16000, 400, 1), 16000, "WAV", "PCM_16")
    return {
        "mono16k_pcm16.wav": pcm,
        "octo8k_float.wav": audio_bytes(tone(8000, 40, 8), 8000, "WAV", "FLOAT"),
        "stereo44k_pcm24.wav": audio_bytes(tone(44100, 200, 2), 44100, "WAV", "PCM_24"),
        "nan_float.wav": audio_bytes(nan, 16000, "WAV", "FLOAT"),
        "empty.wav": audio_bytes(np.zeros((0, 1), np.float32), 16000, "WAV", "PCM_16"),
        "truncated.wav": pcm[:100],
        "mono192k.flac": audio_bytes(tone(192000, 1920, 1), 192000, "FLAC", "PCM_16"),
        "octo48k.flac": audio_bytes(tone(48000, 96, 8), 48000, "FLAC", "PCM_24"),
    }


def _model(nodes: list[onnx.NodeProto], inits: list[TensorProto], opset: int = 17) -> bytes:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _weights() -> np.ndarray:
    """The [K, N] weight that the external-data seed reads from the harness's weights.bin."""
    return np.frombuffer(EXTERNAL_DATA[: K * N * 4], np.float32).reshape(K, N).copy()


def onnx_seeds() -> dict[str, bytes]:
    """A float MatMul, a W8A8 QDQ MatMul, an INT4 block-weight MatMul, a weight in external
    data (`weights.bin`) and a QDQ pair whose scale is a Constant node."""
    w = _weights()
    float_mm = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                      [numpy_helper.from_array(w, "w")])
    w_scale = np.abs(w).max(axis=0) / 127 + 1e-3
    w_q = np.round(w / w_scale).astype(np.int8)
    w8a8 = _model([
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="dq_w", axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ], [numpy_helper.from_array(np.float32(0.05), "xs"),
        numpy_helper.from_array(np.int8(0), "xz"), numpy_helper.from_array(w_q, "wq"),
        numpy_helper.from_array(w_scale.astype(np.float32), "ws")], opset=13)
    w4 = _model([
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="dq_w", axis=0,
                         block_size=8),
        helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"),
    ], [helper.make_tensor("wq", TensorProto.INT4, (K, N), np.clip(w_q, -8, 7).ravel().tolist()),
        numpy_helper.from_array(np.full((K // 8, N), 0.1, np.float32), "ws")], opset=21)
    external = onnx.load_from_string(float_mm)
    tensor = external.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", EXTERNAL_FILE), ("offset", "0"), ("length", str(K * N * 4))):
        tensor.external_data.add(key=key, value=value)
    const_scale = _model([
        helper.make_node("Constant", [], ["s"], value_float=0.05),
        helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"], name="dq_x"),
        helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm"),
    ], [numpy_helper.from_array(w, "w")])
    return {"float_matmul.onnx": float_mm, "w8a8.onnx": w8a8, "w4_block.onnx": w4,
            "external_data.onnx": external.SerializeToString(), "constant_scale.onnx": const_scale}


def recipes() -> dict[str, Recipe]:
    """A version-2 recipe with an activation, an INT8 weight and a stored GPTQ weight, and
    one with round-to-nearest weights only."""
    act = TensorRecipe("x", "activation", QuantSpec(8, "tensor", None, None), "mse", ("mm",),
                       scale=0.05, stats={"absmax": 6.35, "n_values": 1024})
    int8 = TensorRecipe("w", "weight", QuantSpec(8, "channel", 1, None), "absmax", ("mm",))
    gptq = TensorRecipe("w2", "weight", QuantSpec(4, "block", 0, 32, zero_point=True), "gptq",
                        ("mm2",), note="act-order")
    skipped = (Skipped("softmax", "Softmax", "no weighted input"),)
    digest = "0" * 63 + "1"
    return {
        "gptq.json": Recipe(digest, 7, {"weight_bits": 4, "calibrator": {"method": "mse"}},
                            (act, int8, gptq), skipped, weight_data="f" * 64),
        "w8a8.json": Recipe(digest, 0, {"weight_bits": 8}, (act, int8)),
    }


def recipe_seeds() -> dict[str, bytes]:
    """`recipes()` as recipe.json bytes, plus one in the version-1 layout."""
    seeds = {name: r.to_json().encode() for name, r in recipes().items()}
    v1 = json.loads(seeds["w8a8.json"])
    v1["_version"] = 1
    del v1["_data"]["weight_data"]
    seeds["version1.json"] = json.dumps(v1, indent=2).encode()
    return seeds


def cards() -> dict[str, ModelCard]:
    """A generic card (as `export_onnx_file` writes), an English-only Whisper card and a
    multilingual one that reads its language tokens from the folder's tokenizer.json."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(onnx_seeds()["float_matmul.onnx"])
        generic = export_onnx_file(src, Path(tmp) / "out")
    decoding = WhisperDecoding(prompt=(50257, 50362), eot=50256, timestamp_begin=50363,
                               suppress=(1, 2, 7), suppress_begin=(220, 50256),
                               max_target_positions=448, n_layers=4, n_heads=6, head_dim=64,
                               vocab_size=51864)
    graphs = {"encoder": GraphSpec("encoder.onnx", (), ()),
              "decoder": GraphSpec("decoder.onnx", (), ())}
    english = ModelCard("whisper-tiny.en", "whisper", graphs, "whisper-teacher-forced",
                        {"zoo": "whisper-tiny.en"}, LogMelSpec().to_dict(), "tokenizer.json",
                        decoding)
    multi = ModelCard("whisper-base", "whisper", graphs, "whisper-teacher-forced",
                      {"zoo": "whisper-base"}, LogMelSpec().to_dict(), "tokenizer.json",
                      replace(decoding, vocab_size=51865))
    return {"generic.json": generic, "english.json": english, "multilingual.json": multi}


def card_seeds() -> dict[str, bytes]:
    """`cards()` as card.json bytes."""
    return {name: (json.dumps(c.to_dict(), indent=2, sort_keys=True) + "\n").encode()
            for name, c in cards().items()}


SEEDS = {"audio": audio_seeds, "onnx": onnx_seeds, "recipe": recipe_seeds, "card": card_seeds}


def write_corpus() -> None:
    """Rewrite `corpus/<target>/` from the seeds above."""
    for target, make in SEEDS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for name, data in make().items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    write_corpus()
