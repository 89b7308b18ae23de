"""Crash safety (issue 15): a folder of outputs is published in one step, so a process killed
with SIGKILL at any instant leaves the whole old folder or the whole new one; staging left by
killed runs is swept; builds at once share the zoo export cache through a lock."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sfc import atomic
from sfc.atomic import file_lock, staging_dir
from sfc.card import ModelCard
from sfc.models.zoo import EXPORT_FORMAT
from tests.test_build import _feeds, _mlp


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content digest of every file under `folder` (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _stages(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".stage-" in p.name]


def test_publish_keeps_other_files_replaces_outputs_and_keeps_the_mode(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staging_dir(out) as stage:
        assert not out.exists()  # nothing under the final name while the run works
        (stage / "a.txt").write_text("new a")
        (stage / "g").mkdir()
        (stage / "g" / "m.onnx").write_text("model 1")
    assert (out / "g" / "m.onnx").read_text() == "model 1"
    (out / "notes.txt").write_text("the user's own file")
    (out / "g" / "extra.bin").write_text("kept")
    os.symlink("a.txt", out / "link")
    out.chmod(0o750)
    with staging_dir(out) as stage:
        (stage / "g").mkdir()
        (stage / "g" / "m.onnx").write_text("model 2")
    assert (out / "g" / "m.onnx").read_text() == "model 2"
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert (out / "g" / "extra.bin").read_text() == "kept"
    assert os.readlink(out / "link") == "a.txt" and (out / "a.txt").read_text() == "new a"
    assert out.stat().st_mode & 0o777 == 0o750
    assert _stages(tmp_path) == []


def test_a_failed_run_changes_nothing_and_leaves_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "g").mkdir(parents=True)
    (out / "g" / "m.onnx").write_text("old")
    before = _snapshot(out)
    with pytest.raises(RuntimeError), staging_dir(out) as stage:
        (stage / "g").mkdir()
        (stage / "g" / "m.onnx").write_text("half")
        raise RuntimeError("the build failed")
    assert _snapshot(out) == before and _stages(tmp_path) == []
    with pytest.raises(RuntimeError), staging_dir(tmp_path / "never") as stage:
        raise RuntimeError
    assert not (tmp_path / "never").exists()


def test_staging_of_a_dead_process_is_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".out.stage-{int(dead.stdout)}-0000"
    live = tmp_path / f".out.stage-{os.getppid()}-0000"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "x").write_text("left behind")
    with staging_dir(tmp_path / "out") as stage:
        (stage / "y").write_text("new")
    assert not stale.exists() and live.exists()


def test_where_the_swap_is_refused_files_are_renamed_one_by_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(a: Path, b: Path) -> None:
        raise OSError(errno.EINVAL, "no RENAME_EXCHANGE here")

    monkeypatch.setattr(atomic, "_exchange", refuse)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("kept")
    (out / "m.onnx").write_text("old")
    with staging_dir(out) as stage:
        (stage / "m.onnx").write_text("new")
    assert (out / "m.onnx").read_text() == "new" and (out / "old.txt").read_text() == "kept"
    assert _stages(tmp_path) == []


def test_a_folder_holding_the_current_directory_is_written_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    monkeypatch.chdir(out / "sub")
    with staging_dir(out) as stage:
        assert stage.parent == out  # the current directory is never swapped away
        (stage / "m.onnx").write_text("new")
    assert (out / "m.onnx").read_text() == "new" and Path.cwd() == out / "sub"
    assert _stages(out) == []


def test_a_file_in_the_way_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(atomic.SfcError, match="not a folder"), staging_dir(tmp_path / "out"):
        pass


# A child that stages `files` new files over an old folder of the same names plus `kept`
# files it does not replace, says "staged", then publishes and says "published".
_PUBLISHER = """
import sys
from pathlib import Path
from sfc.atomic import staging_dir
out, files = Path(sys.argv[1]), int(sys.argv[2])
with staging_dir(out) as stage:
    for i in range(files):
        (stage / f"f{i:04d}").write_text("new")
    print("staged", flush=True)
print("published", flush=True)
"""


def _old_folder(out: Path, files: int, kept: int) -> None:
    out.mkdir()
    for i in range(files):
        (out / f"f{i:04d}").write_text("old")
    for i in range(kept):
        (out / f"k{i:04d}").write_text("kept")


def test_sigkill_while_publishing_leaves_the_old_folder_or_the_new_one(tmp_path: Path) -> None:
    files, kept = 200, 1500  # the kept files make the links before the swap take a while
    # One undisturbed run: how long does the publication take here?
    _old_folder(tmp_path / "timing", files, kept)
    child = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(tmp_path / "timing"),
                              str(files)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "staged"
    began = time.perf_counter()
    assert child.stdout.readline().strip() == "published"
    window = time.perf_counter() - began
    child.wait()
    rng = np.random.default_rng(15)
    outcomes = set()
    for trial in range(8):
        out = tmp_path / f"out{trial}"
        _old_folder(out, files, kept)
        child = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(out), str(files)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "staged"
        # The first kill comes at once, before the swap; the others anywhere in the window.
        time.sleep(float(rng.uniform(0.0, 1.2 * window)) if trial else 0.0)
        child.send_signal(signal.SIGKILL)
        child.wait()
        contents = {p.read_text() for p in out.glob("f*")}
        assert contents in ({"old"}, {"new"}), f"trial {trial}: a mixed folder {contents}"
        assert len(list(out.glob("f*"))) == files and len(list(out.glob("k*"))) == kept
        outcomes.add(contents.pop())
        # The next run into the folder succeeds and sweeps what the killed one left.
        done = subprocess.run([sys.executable, "-c", _PUBLISHER, str(out), str(files)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert {p.read_text() for p in out.glob("f*")} == {"new"}
        assert _stages(tmp_path) == []
    assert "old" in outcomes  # the kills did land before the swap


def _fake_export(model: str, folder: Path) -> None:
    """Stands in for the torch export: slow, and counts its runs in a file."""
    with staging_dir(folder) as stage:
        ModelCard(name=model, family="whisper", graphs={}, objective="whisper-teacher-forced",
                  source={"format": EXPORT_FORMAT}).save(stage)
        time.sleep(1.0)
        (stage / "encoder").mkdir()
        (stage / "encoder" / "model.onnx").write_text("weights")
    with open(folder.parent / "exports.count", "a") as count:
        count.write(f"{os.getpid()}\n")


def _open_model(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from sfc.models import model_folder

    folder = model_folder("whisper-tiny.en")
    queue.put(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))


def test_builds_at_once_export_once_and_never_read_half_an_export(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sfc.models

    monkeypatch.setenv("SFC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sfc.models, "_export_in_child", _fake_export)
    context = multiprocessing.get_context("fork")  # the children keep the fake exporter
    queue = context.Queue()
    children = [context.Process(target=_open_model, args=(queue,)) for _ in range(3)]
    for child in children:
        child.start()
    seen = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert seen == [["card.json", "encoder/model.onnx"]] * 3
    assert len((tmp_path / "cache" / "exports" / "exports.count").read_text().split()) == 1


def test_file_lock_makes_a_second_holder_wait(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    let_go = tmp_path / "let-go"
    code = ("import time\nfrom pathlib import Path\nfrom sfc.atomic import file_lock\n"
            f"with file_lock({str(lock)!r}):\n    print('held', flush=True)\n"
            f"    time.sleep(1.5)\n    Path({str(let_go)!r}).touch()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with file_lock(lock):
        assert let_go.exists()  # we got the lock only once the holder let go
    holder.wait()
    # A killed holder never leaves the lock taken.
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    with file_lock(lock):
        pass


_BUILD = ["build", "{src}", "-o", "{out}", "--calib", "{feeds}", "--calibrator", "{how}",
          "--no-eval"]


def _build_argv(src: Path, out: Path, feeds: Path, how: str) -> list[str]:
    return [sys.executable, "-m", "sfc.cli", *(a.format(src=src, out=out, feeds=feeds, how=how)
                                               for a in _BUILD)]


def _outputs(folder: Path) -> dict[str, str]:
    """The build's files, less the report (it holds wall times) and the `.ort` files
    (ONNX Runtime's serialisation is not byte-stable from one process to the next)."""
    return {k: v for k, v in _snapshot(folder).items()
            if not k.startswith("report.") and not k.endswith(".ort")}


def test_sigkill_during_sfc_build_leaves_the_earlier_build_intact(tmp_path: Path) -> None:
    src, feeds = _mlp(tmp_path / "mlp.onnx"), _feeds(tmp_path / "feeds", n=40)
    env = {**os.environ, "SFC_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "build"
    first = subprocess.run(_build_argv(src, out, feeds, "max"), env=env,
                           capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    old = _snapshot(out)
    began = time.perf_counter()  # a reference build of the other configuration
    ref = subprocess.run(_build_argv(src, tmp_path / "ref", feeds, "entropy"), env=env,
                         capture_output=True, text=True, check=False)
    assert ref.returncode == 0, ref.stderr
    length = time.perf_counter() - began
    new = _outputs(tmp_path / "ref")
    assert new != _outputs(out)
    rng = np.random.default_rng(16)
    for trial in range(4):
        child = subprocess.Popen(_build_argv(src, out, feeds, "entropy"), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.3, 1.1)) * length)
        child.send_signal(signal.SIGKILL)
        child.wait()
        if _snapshot(out) != old:  # the build had finished: then it is whole
            assert _outputs(out) == new, f"trial {trial}: a mixed build folder"
            break
    done = subprocess.run(_build_argv(src, out, feeds, "entropy"), env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert _outputs(out) == new and _stages(tmp_path) == []
