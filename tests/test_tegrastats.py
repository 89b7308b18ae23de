"""Jetson telemetry: tegrastats lines (real samples in tests/fixtures/tegrastats/), the
power integration, the background sampler, and the board/release/power-mode readers."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from sfc.bench.jetson import (
    jetson_info,
    parse_dpkg_version,
    parse_nvpmodel,
    parse_tegra_release,
)
from sfc.bench.tegrastats import (
    SUM_OF_RAILS,
    Rail,
    TegraSample,
    TegrastatsSampler,
    parse_line,
    summarize,
)
from sfc.errors import SfcError

FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats"
ORIN = FIXTURES / "orin_nano_jp6_idle.txt"
XAVIER = FIXTURES / "xavier.txt"
# Prints a fixture's lines every 20 ms, like `tegrastats --interval 20`, for at most 10 s.
REPLAY = ("import sys, time\n"
          "lines = open(sys.argv[1]).read().splitlines()\n"
          "for i in range(500):\n"
          "    print(lines[i % len(lines)], flush=True)\n"
          "    time.sleep(0.02)\n")


def test_orin_jetpack6_line() -> None:
    s = parse_line(ORIN.read_text())
    assert s.stamp == "05-05-2025 06:05:39"
    assert (s.ram_used_mb, s.ram_total_mb) == (2639, 7620)
    assert s.cpu_load_pct == (1, 4, 8, 4, 5, 4)
    assert s.gpu_load_pct == 0 and s.gpu_freq_mhz == ()
    assert s.emc_load_pct is None and s.emc_freq_mhz is None  # this line has no EMC field
    assert s.rails == (Rail("VDD_IN", 5263, 5263), Rail("VDD_CPU_GPU_CV", 717, 717),
                       Rail("VDD_SOC", 1794, 1794))
    assert s.input_power() == ("VDD_IN", 5263)


def test_xavier_line() -> None:
    """L4T 32: rails without units, temperatures named like rails (GPU@30.5C vs GPU 463/463),
    no input rail, so the input power is the sum of the rails."""
    s = parse_line(XAVIER.read_text())
    assert s.stamp is None
    assert (s.ram_used_mb, s.ram_total_mb) == (14700, 15692)
    assert s.cpu_load_pct == (0, 0, 0, 0)
    assert s.gpu_load_pct == 0 and s.emc_load_pct == 0
    assert [r.name for r in s.rails] == ["GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"]
    assert [r.now_mw for r in s.rails] == [463, 618, 2936, 0, 309, 3306]
    assert s.input_power() == (SUM_OF_RAILS, 463 + 618 + 2936 + 0 + 309 + 3306)


def test_loaded_agx_orin_fields() -> None:
    """The loaded-Orin fragments quoted in the fixtures' SOURCES: GR3D with a per-GPC
    frequency list, EMC with its frequency, AGX Orin rails (no VDD_IN), a core that is off."""
    line = ("RAM 5120/30536MB (lfb 2x4MB) SWAP 0/15268MB (cached 0MB) CPU [12%@2201,off] "
            "EMC_FREQ 61%@2133 GR3D_FREQ 99%@[612] NVDEC off NVJPG off VIC off OFA off APE 200 "
            "VDD_GPU_SOC 3193mW/3193mW VDD_CPU_CV 399mW/399mW VIN_SYS_5V0 4306mW/4306mW")
    s = parse_line(line)
    assert s.cpu_load_pct == (12, None)
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (99, (612,))
    assert (s.emc_load_pct, s.emc_freq_mhz) == (61, 2133)
    assert [r.name for r in s.rails] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]
    assert s.input_power() == (SUM_OF_RAILS, 3193 + 399 + 4306)


def test_not_a_tegrastats_line() -> None:
    with pytest.raises(SfcError, match="not a tegrastats line"):
        parse_line("tegrastats: command not found")


def _sample(power_mw: float, gpu_load: float) -> TegraSample:
    return TegraSample(ram_used_mb=1000 + gpu_load, ram_total_mb=8000, cpu_load_pct=(10, None),
                       gpu_load_pct=gpu_load, gpu_freq_mhz=(600,), emc_load_pct=5,
                       emc_freq_mhz=2133, rails=(Rail("VDD_IN", power_mw, 0),))


def test_summary_integrates_power_over_the_window() -> None:
    """Power rising linearly, 1000 + 100 t mW, sampled each second: the window [2.5, 7.5]
    holds (1000 + 500) mW * 5 s = 7500 mJ; the loads are those of the samples that cover
    it (after its start, up to the first at or after its end)."""
    timed = [(float(t), _sample(1000 + 100 * t, gpu_load=t)) for t in range(11)]
    s = summarize(timed, 2.5, 7.5, items=3)
    assert s.power_rail == "VDD_IN"
    assert s.energy_mj == pytest.approx(7500)
    assert s.power_mw == pytest.approx(1500)
    assert s.energy_mj_per_item == pytest.approx(2500)
    assert s.rails_mw == {"VDD_IN": pytest.approx(1500)}
    assert s.samples == 6 and s.gpu_load_pct == pytest.approx(5.5)  # samples at t = 3..8
    assert s.cpu_load_pct == 10  # the core that is off is left out
    assert s.ram_used_mb == 1010  # the whole run's largest, not only the window's
    assert (s.gpu_freq_mhz, s.emc_freq_mhz, s.window_s, s.items) == (600, 2133, 5.0, 3)


def test_summary_of_a_window_shorter_than_the_interval() -> None:
    """Both readings lie outside the window: power is interpolated between them and the load
    comes from the one reading that covers it."""
    timed = [(0.0, _sample(1000, 0)), (1.0, _sample(2000, 80))]
    s = summarize(timed, 0.4, 0.6, items=1)
    assert s.power_mw == pytest.approx(1500) and s.energy_mj == pytest.approx(300)
    assert s.samples == 1 and s.gpu_load_pct == 80
    with pytest.raises(SfcError, match="no samples"):
        summarize([], 0.0, 1.0, items=1)


def test_sampler_reads_a_running_process() -> None:
    """The sampler timestamps lines as they arrive, and on exit waits for one line after
    the measured part before it stops the process."""
    with TegrastatsSampler(20, command=[sys.executable, "-c", REPLAY, str(ORIN)]) as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        time.sleep(0.05)
        end = time.monotonic()
    times = [t for t, _ in sampler.samples]
    assert len(times) >= 3 and times == sorted(times) and times[-1] > end
    assert all(s.rails[0].name == "VDD_IN" for _, s in sampler.samples)
    summary = sampler.summary(start, end, items=2)
    assert summary.power_mw == pytest.approx(5263)
    assert summary.energy_mj_per_item == pytest.approx(5263 * (end - start) / 2)


def test_sampler_failures_are_one_line() -> None:
    with pytest.raises(SfcError, match="cannot run /no/such/tegrastats"):
        TegrastatsSampler(command=["/no/such/tegrastats"]).__enter__()
    with TegrastatsSampler(command=[sys.executable, "-c", "print('Permission denied')"]) as s:
        pass
    with pytest.raises(SfcError, match="no samples during the run: Permission denied"):
        s.summary(0.0, 1.0, items=1)


# --- the board, release and power mode (jetson.py) -----------------------------------------

RELEASE = ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
           "DATE: Fri Sep 13 04:36:44 UTC 2024\n")


def test_release_and_power_mode_parsers() -> None:
    assert parse_tegra_release(RELEASE) == "36.4.0"
    assert parse_tegra_release("# R32 (release), REVISION: 7.1, GCID: 1\n") == "32.7.1"
    assert parse_tegra_release("Ubuntu 22.04") is None
    assert parse_dpkg_version("36.4.3-20250107174145") == "36.4.3"
    assert parse_nvpmodel("NV Power Mode: MAXN\n0\n") == ("MAXN", 0)
    assert parse_nvpmodel("NVPM WARN: patching tpc_pg_mask\nNV Power Mode: 15W\n2\n") == ("15W", 2)
    assert parse_nvpmodel("") == (None, None)


def test_jetson_info_reads_files_and_commands(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(RELEASE)
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_text("NVIDIA Jetson Orin Nano\x00")
    calls: list[tuple[str, ...]] = []

    def run(argv: object) -> str | None:
        calls.append(tuple(argv))  # type: ignore[arg-type]
        return {"nvpmodel": "NV Power Mode: 25W\n1\n",
                "dpkg-query": "36.4.3-20250107174145"}.get(calls[-1][0])

    info = jetson_info(run, tmp_path)
    assert (info.model, info.l4t, info.power_mode, info.power_mode_id) == (
        "NVIDIA Jetson Orin Nano", "36.4.0", "25W", 1)
    assert [c[0] for c in calls] == ["nvpmodel"]  # the release file made dpkg unnecessary
    (tmp_path / "etc" / "nv_tegra_release").unlink()
    assert jetson_info(run, tmp_path).l4t == "36.4.3"  # from the nvidia-l4t-core package
    bare = jetson_info(lambda argv: None, tmp_path / "none")
    assert (bare.model, bare.l4t, bare.power_mode, bare.power_mode_id) == (None,) * 4
