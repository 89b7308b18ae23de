"""benchmarks/rtf_vs_faster_whisper.py: argument checks, variant names, the windowing and
regrouping of the cross-file CTranslate2 variant, the speed ratio's direction, the paired WER
differences and the summary on synthetic rounds, and (slow) the whole script in throughput
mode on two files."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import bench_module

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCRIPT = BENCH / "rtf_vs_faster_whisper.py"
EVAL = REPO / "calibration_data" / "eval"


@pytest.fixture(scope="module")
def rvf() -> Any:
    """The script as a module (it imports its sibling `common` by name)."""
    return bench_module("rtf_vs_faster_whisper")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "card.json").write_text("{}")
    return folder


def test_parse_build_returns_label_and_resolved_folder(rvf: Any, model_dir: Path) -> None:
    label, folder = rvf.parse_build(f"w8a8={model_dir}")
    assert label == "w8a8"
    assert folder == model_dir.resolve()


@pytest.mark.parametrize("spec", ["w8a8", "=FOLDER", "w8a8=", "-x=FOLDER", "a b=FOLDER",
                                  "a/b=FOLDER"])
def test_parse_build_rejects_malformed_specs(rvf: Any, model_dir: Path, spec: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        rvf.parse_build(spec.replace("FOLDER", str(model_dir)))


def test_parse_build_rejects_a_folder_without_card(rvf: Any, tmp_path: Path) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"card\.json"):
        rvf.parse_build(f"x={tmp_path}")


def test_parse_args_rejects_repeated_and_reserved_labels_and_batch_0(
        rvf: Any, model_dir: Path) -> None:
    for argv in (["--sfc-build", f"a={model_dir}", "--sfc-build", f"a={model_dir}"],
                 ["--sfc-build", f"ort-fp32={model_dir}"],
                 ["--batch", "0"]):
        with pytest.raises(SystemExit):
            rvf.parse_args(argv)


def test_default_json_names_mode_and_threads(rvf: Any, tmp_path: Path) -> None:
    latency = rvf.parse_args(["--threads", "1"]).json
    throughput = rvf.parse_args(["--batch", "8", "--threads", "2"]).json
    assert latency.name == "rtf_vs_faster_whisper_t1.json"
    assert throughput.name == "rtf_vs_faster_whisper_batch8_t2.json"
    assert rvf.parse_args(["--json", str(tmp_path / "x.json")]).json == tmp_path / "x.json"


def test_variant_names_by_mode(rvf: Any) -> None:
    assert rvf.variant_names(["w8a8"], 1) == (
        "sfc-ort-fp32", "sfc-w8a8", "faster-whisper-fp32", "faster-whisper-int8")
    assert rvf.variant_names([], 8)[-1] == "ct2-int8-batch8"
    assert not any(v.startswith("ct2") for v in rvf.variant_names([], 1))
    assert rvf.variant_names(["w8a8"], 1, spin=True) == (
        "sfc-ort-fp32", "sfc-w8a8", "sfc-ort-fp32+spin", "sfc-w8a8+spin",
        "faster-whisper-fp32", "faster-whisper-int8")
    assert rvf.variant_names(["w8a8"], 1, window=True) == (
        "sfc-ort-fp32", "sfc-w8a8", "sfc-ort-fp32+window", "sfc-w8a8+window",
        "faster-whisper-fp32", "faster-whisper-int8")


def test_a_bad_sfc_window_is_refused_by_the_parser(rvf: Any) -> None:
    assert rvf.parse_args(["--sfc-window", "fit"]).sfc_window == "fit"
    with pytest.raises(SystemExit):
        rvf.parse_args(["--sfc-window", "half"])


def test_limit_0_selects_every_utterance(rvf: Any) -> None:
    lines = [ln for ln in (EVAL / "manifest.jsonl").read_text().splitlines() if ln.strip()]
    ids = [json.loads(ln)["id"] for ln in lines]
    assert [u.id for u in rvf._select(EVAL, 0)] == ids
    assert [u.id for u in rvf._select(EVAL, 5)] == ids[:5]


def test_chunks_cover_every_index_once_in_order(rvf: Any) -> None:
    parts = list(rvf.chunks(7, 3))
    assert [list(range(7))[p] for p in parts] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(rvf.chunks(0, 3)) == []


def test_fixed_clips_are_contiguous_30_s_spans(rvf: Any) -> None:
    clips = rvf.fixed_clips(65.5)
    assert [(c["start"], c["end"]) for c in clips] == [(0, 30), (30, 60), (60, 65.5)]
    assert rvf.fixed_clips(4.2) == [{"start": 0.0, "end": 4.2}]


def test_feature_windows_cut_and_zero_pad(rvf: Any) -> None:
    feats = np.random.default_rng(0).standard_normal((80, 6500)).astype(np.float32)
    win = rvf.feature_windows(feats, 3000)
    assert win.shape == (3, 80, 3000)
    joined = np.concatenate(list(win), axis=1)
    np.testing.assert_array_equal(joined[:, :6500], feats)
    assert not joined[:, 6500:].any()
    assert rvf.feature_windows(np.zeros((80, 0), np.float32), 3000).shape == (1, 80, 3000)


def test_regroup_joins_each_recordings_windows(rvf: Any) -> None:
    assert rvf.regroup(["a", "", "b", "c d"], [2, 1, 1]) == ["a", "b", "c d"]
    with pytest.raises(ValueError):
        rvf.regroup(["a"], [2])


def test_speed_ratio_above_1_means_this_variant_is_faster(rvf: Any) -> None:
    ref = [{"compute_s": [1.0, 1.0]}, {"compute_s": [3.0]}]
    fast = [{"compute_s": [0.5, 0.5]}, {"compute_s": [1.0]}]
    assert rvf.speed_ratios(ref, fast) == [2.0, 3.0]


REFS = ["the cat sat on the mat", "a dog ran home", "hello world"]  # 6 + 4 + 2 words


def _run(hyps: list[str], compute: list[float], rss: int) -> dict[str, Any]:
    return {"hyps": hyps, "compute_s": compute, "audio_s": [2.0, 2.0, 2.0],
            "load_s": 0.1, "warmup_s": 0.1, "peak_rss_kib": rss}


def test_summarize_ratios_deltas_rss_and_agreement(rvf: Any) -> None:
    one_error = ["the cat sat on the mat", "a dog ran", "hello world"]
    two_errors = ["the cat sat on a mat", "a dog ran", "hello world"]
    rounds = [
        {"sfc-ort-fp32": _run(REFS, [1.0, 1.0, 1.0], 500),
         "faster-whisper-int8": _run(one_error, [2.0, 2.0, 2.0], 300),
         "sfc-x": _run(two_errors, [3.0, 3.0, 3.0], 400)},
        {"sfc-ort-fp32": _run(REFS, [1.0, 1.0, 1.0], 700),
         "faster-whisper-int8": _run(one_error, [4.0, 4.0, 4.0], 300),
         "sfc-x": _run(["x", *two_errors[1:]], [2.0, 2.0, 2.0], 400)},
    ]
    s = rvf.summarize(rounds, REFS, ["sfc-ort-fp32", "faster-whisper-int8", "sfc-x"])

    # fw-int8's total time / this variant's, per round: sfc 6/3 and 12/3; sfc-x 6/9, 12/6.
    assert s["sfc-ort-fp32"]["speedup_vs_fw_int8_median"] == pytest.approx(3.0)
    assert s["sfc-x"]["speedup_vs_fw_int8_median"] == pytest.approx((6 / 9 + 2) / 2)
    assert s["sfc-ort-fp32"]["peak_rss_kib_max"] == 700

    assert s["sfc-x"]["errors"] == [1, 1, 0]
    vs_fw = s["sfc-x"]["wer_delta_vs_faster-whisper-int8"]
    vs_sfc = s["sfc-x"]["wer_delta_vs_sfc-ort-fp32"]
    assert vs_fw["delta"] == pytest.approx(1 / 12)
    assert vs_sfc["delta"] == pytest.approx(2 / 12)
    assert vs_fw["lo"] <= vs_fw["delta"] <= vs_fw["hi"]
    # sfc-x is never better than sfc on any utterance, worse on two
    assert vs_sfc["lo"] >= 0
    assert vs_sfc["hi"] > 0
    own = s["faster-whisper-int8"]["wer_delta_vs_faster-whisper-int8"]
    assert (own["delta"], own["lo"], own["hi"]) == (0.0, 0.0, 0.0)

    assert s["faster-whisper-int8"]["same_as_sfc"] == 2
    assert s["sfc-x"]["stable_across_rounds"] == 2  # round 2 changed its first file


def test_table_labels_the_mode_and_marks_references(rvf: Any) -> None:
    rounds = [{"sfc-ort-fp32": _run(REFS, [1.0, 1.0, 1.0], 2048),
               "faster-whisper-int8": _run(REFS, [2.0, 2.0, 2.0], 1024)}]
    variants = ["sfc-ort-fp32", "faster-whisper-int8"]
    s = rvf.summarize(rounds, REFS, variants)
    lat_headers, lat_rows = rvf.table(s, variants, 3, 1)
    thr_headers, thr_rows = rvf.table(s, variants, 3, 4)
    assert "RTF median" in lat_headers and "p50 ms/file" in lat_headers
    assert "audio s / s median" in thr_headers and "p50 ms/call" in thr_headers
    sfc_row = dict(zip(lat_headers, lat_rows[0], strict=True))
    assert sfc_row["fw-int8 s / this s"] == "2.00x"
    assert sfc_row["vs sfc-fp32 ΔWER [CI]"] == "(ref)"
    assert sfc_row["peak RSS MiB"] == "2"
    assert dict(zip(thr_headers, thr_rows[0], strict=True))["audio s / s median"] == "2.0"


@pytest.mark.slow
def test_script_throughput_mode_end_to_end(tiny_export: Path, tmp_path: Path) -> None:
    """Two files, batch 2: sfc's FP32 export under a second label decodes like sfc-ort-fp32,
    and CTranslate2's cross-file batch like faster-whisper int8."""
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(SCRIPT), "--limit", "2", "--rounds", "1",
                    "--batch", "2", "--threads", "1", "--sfc-build", f"again={tiny_export}",
                    "--json", str(out)], check=True, cwd=REPO)
    report = json.loads(out.read_text())
    assert report["mode"] == "throughput" and report["batch"] == 2
    assert report["variants"][-1] == "ct2-int8-batch2"
    run = report["runs"][0]
    assert run["sfc-again"]["hyps"] == run["sfc-ort-fp32"]["hyps"]
    assert run["ct2-int8-batch2"]["hyps"] == run["faster-whisper-int8"]["hyps"]
    assert all(len(r["compute_s"]) == 1 for r in run.values())
    assert all(r["peak_rss_kib"] > 0 for r in run.values())


def test_workers_get_the_encoder_window(rvf: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(rvf, "run_marked_worker",
                        lambda cmd, variant, marker: seen.append(cmd) or {})
    rvf.spawn_worker("sfc-ort-fp32+window", rvf.parse_args(["--sfc-window", "fit:pad=4"]))
    cmd = seen[0]
    assert cmd[cmd.index("--sfc-window") + 1] == "fit:pad=4"
    rvf.spawn_worker("sfc-ort-fp32", rvf.parse_args([]))
    assert "--sfc-window" not in seen[1]


def test_a_window_variant_without_a_window_is_refused(rvf: Any) -> None:
    with pytest.raises(ValueError, match="needs --sfc-window"):
        rvf.load_variant("sfc-ort-fp32+window", 1, {}, 1)
