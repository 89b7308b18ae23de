"""`sfc build` end to end on small graphs (fast) and on whisper-tiny.en (weights-only)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfc.build import BuildConfig
from sfc.errors import SfcError
from sfc.pipeline import compile_model
from tests.conftest import EVAL_DATA


def _mlp(path: Path, *, log: bool = False, external: bool = False, act: str = "Relu") -> Path:
    """x[n, 64] -> MatMul -> Relu (or `act`) -> (Log) -> MatMul -> y, with one
    unsupported-op branch."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((128, 32)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node(act, ["h"], ["r"], name="relu")]
    last = "r"
    if log:
        nodes.append(helper.make_node("Log", ["r"], ["l"], name="log"))
        last = "l"
    nodes += [helper.make_node("MatMul", [last, "w2"], ["y"], name="fc2"),
              helper.make_node("Erf", ["y"], ["z"], name="erf")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 32])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=external, size_threshold=0,
              location=f"{path.name}.data" if external else None)
    return path


def _feeds(folder: Path, n: int = 6, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.savez(folder / f"{i:02d}.npz", x=rng.standard_normal((4, 64)).astype(np.float32))
    return folder


def test_same_inputs_and_seed_give_identical_bytes(tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds")
    config = BuildConfig(calibrator="entropy", calib=feeds, seed=7)
    outs = []
    for name in ("a", "b"):
        compile_model(str(src), tmp_path / name, config, eval_data=None)
        outs.append(tmp_path / name / "model")
    for file in ("recipe.json", "model.qdq.onnx"):
        assert (outs[0] / file).read_bytes() == (outs[1] / file).read_bytes(), file
    recipe = json.loads((outs[0] / "recipe.json").read_text())["_data"]
    assert recipe["seed"] == 7 and recipe["config"]["calibration"]["method"] == "entropy"
    # Other calibration data gives other scales: the test above could fail.
    compile_model(str(src), tmp_path / "c", BuildConfig(calibrator="entropy", seed=7,
                  calib=_feeds(tmp_path / "feeds2", seed=1)), eval_data=None)
    assert (tmp_path / "c/model/recipe.json").read_bytes() != (outs[0] / "recipe.json").read_bytes()


def test_generic_build_reports_fusion_unsupported_ops_and_distortion(tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx", external=True), _feeds(tmp_path / "feeds")
    config = BuildConfig(calib=feeds, calibrator="max")
    rss_mib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text()
                   .splitlines() if line.startswith("VmRSS:")) / 1024
    report = compile_model(str(src), tmp_path / "out", config, eval_data=None)
    graph = report.graphs[0]
    # The census accounts for both MatMuls: fused into an integer kernel or named as float
    # (ORT 1.31 leaves a MatMul whose quantized input is a graph input unfused).
    fused = sum(graph["lowering"]["fused"].values())
    assert fused >= 1 and fused + len(graph["lowering"]["float_weighted"]) == 2
    assert any(s["op_type"] == "Erf" for s in graph["skipped"])  # listed, stays float
    assert report.distortion is not None
    assert 0 < report.distortion.rel_l2["z"] < 0.15 and report.distortion.cosine["z"] > 0.99
    md = (tmp_path / "out" / "report.md").read_text()
    assert "relative L2" in md and "| model | `w1` | weight |" in md
    # The build's peak memory: this process's, so at least what it held before the build
    # (less 1 MiB: the kernel syncs per-thread RSS counters into the high-water mark
    # lazily, so VmRSS was once read 32 KiB above it).
    assert report.peak_rss_mib is not None and report.peak_rss_mib >= rss_mib - 1
    assert f"peak resident memory: {report.peak_rss_mib:.0f} MiB" in md


def test_nan_statistics_stop_the_build_naming_the_tensor(tmp_path: Path) -> None:
    # Log of zeros after Relu gives -inf: the statistics of 'l' are not finite.
    src, feeds = _mlp(tmp_path / "mlp.onnx", log=True), _feeds(tmp_path / "feeds")
    out = tmp_path / "out"
    with pytest.raises(SfcError, match="'l'"):
        compile_model(str(src), out, BuildConfig(calib=feeds, calibrator="max"), eval_data=None)
    assert not out.exists() or not any(p.suffix == ".onnx" for p in out.rglob("*"))


def test_recipe_replay_reproduces_the_qdq_model(tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds")
    compile_model(str(src), tmp_path / "a", BuildConfig(calib=feeds, calibrator="max"),
                  eval_data=None)
    replay = BuildConfig(calib=tmp_path / "nowhere", recipe=tmp_path / "a", calibrator="max")
    compile_model(str(src), tmp_path / "b", replay, eval_data=None)
    assert (tmp_path / "a/model/model.qdq.onnx").read_bytes() == \
        (tmp_path / "b/model/model.qdq.onnx").read_bytes()


def test_replay_refuses_a_recipe_for_another_cpu_class(tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds")
    compile_model(str(src), tmp_path / "vnni",
                  BuildConfig(target="ort-cpu:vnni", calib=feeds, calibrator="max"),
                  eval_data=None)
    replay = BuildConfig(target="ort-cpu:avx2", calib=tmp_path / "nowhere",
                         recipe=tmp_path / "vnni", calibrator="max")
    with pytest.raises(SfcError, match=r"needs INT8 per-channel\(axis 1, pairs <= 128\)"):
        compile_model(str(src), tmp_path / "avx2", replay, eval_data=None)
    out = tmp_path / "avx2"
    assert not out.exists() or not any(p.suffix == ".onnx" for p in out.rglob("*"))
    # 4-bit block weights have no pair limit: such a recipe replays on either class. (Not
    # on the Relu MLP: ORT leaves a 4-bit MatMul followed by Relu unfused, and its ORT
    # format cannot store the INT4 DequantizeLinear left behind.)
    src = _mlp(tmp_path / "sigmoid.onnx", act="Sigmoid")
    compile_model(str(src), tmp_path / "w4", BuildConfig(
        target="ort-cpu:vnni", weights=4, activations=None, calibrator="mse",
        weight_method="rtn"), eval_data=None)
    compile_model(str(src), out, replace(replay, recipe=tmp_path / "w4", activations=None,
                                         calibrator="mse"), eval_data=None)
    assert (tmp_path / "w4/model/model.qdq.onnx").read_bytes() == \
        (out / "model/model.qdq.onnx").read_bytes()


def test_whisper_w4_build_folder_is_a_deployable(tmp_path: Path) -> None:
    from sfc.eval import count_errors, read_manifest
    from sfc.runtime.audio import load_audio
    from sfc.runtime.whisper import WhisperRuntime

    report = compile_model("whisper-tiny.en", tmp_path / "w4",
                           BuildConfig(weights=4, activations=None, weight_method="mse"),
                           eval_data=None)
    assert {g["name"] for g in report.graphs} == {"encoder", "decoder"}
    assert report.compression > 3.0
    for g in report.graphs:
        assert g["lowering"]["fused"].get("MatMulNBits", 0) >= 30
    runtime = WhisperRuntime.open(tmp_path / "w4")
    assert runtime.card.graphs["encoder"].path == "encoder/model.ort.onnx"
    errors = words = 0
    for utt in read_manifest(EVAL_DATA)[:5]:
        counts = count_errors(utt.text, runtime.transcribe(load_audio(utt.audio)).text)
        errors, words = errors + counts.errors, words + counts.ref_words
    assert errors / words < 0.25


def test_whisper_calibration_runs_the_fp32_encoder_once_per_utterance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's calibration feeds come from the encoder's statistics run: the FP32
    runtime's encoder serves no calibration utterance (a max build has no ESC or guard,
    which run it for their references; smoothing, which runs its own FP32 pass over its
    first clips before calibration, is off)."""
    from sfc.calib import stats
    from sfc.runtime.whisper import WhisperRuntime

    encoded, counted = [], []
    monkeypatch.setattr(WhisperRuntime, "encode", lambda self, *a, **k: encoded.append(1))
    add = stats.StatsPass.add

    def counting(self: stats.StatsPass, feed: dict) -> list:
        counted.append(sorted(feed))
        return add(self, feed)

    monkeypatch.setattr(stats.StatsPass, "add", counting)
    config = BuildConfig(calibrator="max", calib_limit=3, act_guard=None, smooth=None)
    compile_model("whisper-tiny.en", tmp_path / "b", config, eval_data=None)
    assert not encoded
    assert counted.count(["input_features"]) == 3  # the encoder, once per utterance
    assert sum("tokens" in f for f in counted) == 3  # the decoder, fed from those runs
    recipe = json.loads((tmp_path / "b" / "decoder" / "recipe.json").read_text())["_data"]
    assert all(t["scale"] > 0 for t in recipe["tensors"] if t["kind"] == "activation")


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"seed": -1}, "--seed"), ({"seed": 1.5}, "--seed"), ({"seed": True}, "--seed"),
    ({"calib_limit": 0}, "--calib-limit"), ({"calib_limit": -2}, "--calib-limit"),
])
def test_build_config_refuses_negative_seeds_and_empty_limits(fields: dict[str, object],
                                                              fragment: str) -> None:
    """The Python API checks what the command line's ranges check: a negative calibration
    limit would slice the set from its end, a negative seed fail deep in the build."""
    with pytest.raises(SfcError, match=fragment):
        BuildConfig(**fields)  # type: ignore[arg-type]
