"""The wheel carries the bundled calibration and evaluation data, and an installed sfc finds
it, its version and its cache (tests/test_packaging.py checks the listed subpackages)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from sfc.eval.manifest import read_manifest
from sfc.info import machine_info
from sfc.models.zoo import ZOO
from sfc.paths import BUNDLED_DATA

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "calibration_data"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sfc's wheel, built from a copy of the files git tracks or would track (an in-place
    build could pick up stale files from the clone's build/)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the wheel is built from git's file list)")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in filter(None, listed):
        if (REPO / name).is_file():  # a tracked file deleted in the work tree is skipped
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    # This environment's setuptools where it meets the build requirement (no download);
    # else pip's isolated build environment fetches one that does.
    import setuptools

    own = int(setuptools.__version__.split(".")[0]) >= 77
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    *(["--no-build-isolation"] if own else []), "--no-cache-dir", "-q",
                    "-w", str(tmp / "dist")], check=True, capture_output=True)
    (built,) = (tmp / "dist").glob("sfc-*.whl")
    return built


def test_wheel_carries_every_bundled_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    on_disk = {f"sfc/calibration_data/{f.relative_to(DATA).as_posix()}"
               for f in DATA.rglob("*") if f.is_file()}
    assert on_disk - names == set(), "add these to [tool.setuptools.package-data]"
    referenced = {f"sfc/calibration_data/{u.audio.relative_to(DATA).as_posix()}"
                  for part in ("calib", "eval") for u in read_manifest(DATA / part)}
    assert referenced and referenced <= names  # the audio both manifests name


def test_installed_wheel_finds_its_data_version_and_cache(wheel: Path, tmp_path: Path) -> None:
    """A pure-Python wheel installs by unpacking: run sfc from the unpacked wheel."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import json, sfc; from sfc.info import machine_info; "
             "from sfc.eval.manifest import read_manifest; mi = machine_info(); "
             "print(json.dumps({'file': sfc.__file__, 'version': sfc.__version__, "
             "'data': mi.data, 'cache': mi.cache, "
             "'clips': [len(read_manifest(f'{mi.data}/{p}')) for p in ('calib', 'eval')]}))")
    env = {**os.environ, "PYTHONPATH": str(site), "SFC_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True,
                          capture_output=True, text=True)
    got = json.loads(done.stdout)
    assert Path(got["file"]) == site / "sfc" / "__init__.py"  # the wheel's, not the clone's
    assert Path(got["data"]) == site / "sfc" / "calibration_data"
    assert got["clips"] == [len(read_manifest(DATA / p)) for p in ("calib", "eval")]
    assert got["cache"] == str(tmp_path / "cache")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert got["version"] == pyproject["project"]["version"]


def test_bundled_data_here_has_both_manifests() -> None:
    for part in ("calib", "eval"):
        assert (BUNDLED_DATA / part / "manifest.jsonl").is_file()
        assert read_manifest(BUNDLED_DATA / part)  # every audio file it names exists


def test_info_says_where_the_checkpoint_and_cache_are(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFC_CACHE", str(tmp_path))
    mi = machine_info()
    assert mi.cache == str(tmp_path) and mi.data == str(BUNDLED_DATA)
    tiny = mi.zoo["whisper-tiny.en"]  # a dependency of sfc, so always installed
    assert not tiny.exported  # nothing in an empty cache
    bins = [Path(f) / b for f, b in zip(tiny.checkpoint, ZOO["whisper-tiny.en"].bin_names,
                                        strict=True)]
    assert bins and all(b.is_file() for b in bins)
