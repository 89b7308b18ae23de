"""The installed `sfc` command in pipes and scripts: plain one-line-per-file transcripts on a
pipe, user data never read as rich markup, `--version`, audio from stdin, `sfc eval` writing
JSON only where asked, and the option spellings shared across commands."""

from __future__ import annotations

import importlib.metadata
import os
import pty
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

from sfc.eval import read_manifest
from sfc.eval.results import EvalResult
from sfc.runtime.audio import load_audio
from sfc.runtime.whisper import WhisperRuntime
from tests.conftest import EVAL_DATA

SFC = shutil.which("sfc")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _sfc(*args: str, stdin: bytes = b"", cwd: Path | None = None,
         ) -> subprocess.CompletedProcess[bytes]:
    """Run the installed command with stdout and stderr piped (the private $SFC_CACHE the
    session set is passed on through the environment)."""
    assert SFC is not None, "the sfc command is not on PATH (pip install -e .)"
    return subprocess.run([SFC, *args], input=stdin, capture_output=True, check=False,
                          env=dict(os.environ), cwd=cwd)


def _assert_user_error(done: subprocess.CompletedProcess[bytes], fragment: str) -> str:
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def runtime(tiny_runtime: WhisperRuntime) -> WhisperRuntime:
    return tiny_runtime


@pytest.fixture()
def short_clips(shortest_clips: list[Path]) -> list[Path]:
    return shortest_clips


def _copies(clips: list[Path], folder: Path, names: list[str]) -> list[Path]:
    """Copies of `clips` under `names` ("/" in a name makes a folder: `a[/b].flac` is the
    file `b].flac` in the folder `a[`, whose path holds the closing tag `[/b]`)."""
    paths = [folder / name for name in names]
    for clip, path in zip(clips, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip, path)
    return paths


def test_version_is_the_installed_distributions() -> None:
    done = _sfc("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"sfc {importlib.metadata.version('sfc')}\n"


def test_piped_transcripts_are_path_tab_text_lines_as_is(
        tiny_export: Path, runtime: WhisperRuntime, short_clips: list[Path],
        tmp_path: Path) -> None:
    # Names rich would read as markup, one long enough that a wrapping printer would break it.
    paths = _copies(short_clips, tmp_path, ["take[1].flac", "[bold]" + "x" * 90 + "[/b].flac"])
    done = _sfc("transcribe", str(tiny_export), "--threads", "1", *map(str, paths))
    assert done.returncode == 0, done.stderr
    expected = "".join(f"{p}\t{runtime.transcribe(load_audio(p)).text}\n" for p in paths)
    assert done.stdout.decode() == expected


def test_terminal_shows_path_colon_text_with_brackets_verbatim(
        tiny_export: Path, runtime: WhisperRuntime, short_clips: list[Path],
        tmp_path: Path) -> None:
    paths = _copies(short_clips, tmp_path, ["[red]take[/red].flac", "take[1].flac"])
    shown = _on_terminal(["transcribe", str(tiny_export), "--threads", "1",
                          *map(str, paths)], tmp_path / "stderr.txt")
    lines = [line for line in _ANSI.sub("", shown).splitlines() if line.strip()]
    assert lines == [f"{p}: {runtime.transcribe(load_audio(p)).text}" for p in paths]


def _on_terminal(args: list[str], stderr_file: Path) -> str:
    """Run the installed command with stdout on a pseudo-terminal; what it showed there."""
    assert SFC is not None
    master, slave = pty.openpty()
    with stderr_file.open("wb") as err:
        proc = subprocess.Popen([SFC, *args], stdout=slave, stderr=err, env=dict(os.environ))
    os.close(slave)
    shown = b"".join(_read_until_closed(master))
    os.close(master)
    assert proc.wait() == 0, stderr_file.read_text()
    return shown.decode()


def _read_until_closed(fd: int) -> Iterator[bytes]:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the command exited and closed the terminal
            return
        if not chunk:
            return
        yield chunk


def test_missing_file_named_like_markup_is_a_one_line_error(
        tiny_export: Path, tmp_path: Path) -> None:
    missing = tmp_path / "take[/b].wav"
    line = _assert_user_error(_sfc("transcribe", str(tiny_export), str(missing)),
                              "does not exist")
    assert line.startswith("error: ") and str(missing) in line


def test_wav_from_stdin_prints_its_text_alone(
        tiny_export: Path, runtime: WhisperRuntime, short_clips: list[Path],
        tmp_path: Path) -> None:
    wav = tmp_path / "clip.wav"
    sf.write(wav, *sf.read(short_clips[0], dtype="int16"), subtype="PCM_16")
    done = _sfc("transcribe", str(tiny_export), "--threads", "1", "-", stdin=wav.read_bytes())
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == runtime.transcribe(load_audio(wav)).text + "\n"


def test_stdin_twice_is_refused(tmp_path: Path) -> None:
    # Refused before the model is opened: no model is needed to see it.
    _assert_user_error(_sfc("transcribe", str(tmp_path), "-", "-"), "once")


@pytest.mark.parametrize(("stdin", "fragment"), [(b"", "stdin is empty"),
                                                 (b"meeting notes", "stdin is not an audio")])
def test_bad_stdin_is_a_one_line_error(tiny_export: Path, stdin: bytes, fragment: str) -> None:
    _assert_user_error(_sfc("transcribe", str(tiny_export), "-", stdin=stdin), fragment)


def test_stdin_on_a_terminal_is_a_one_line_error(tiny_export: Path) -> None:
    assert SFC is not None
    master, slave = pty.openpty()
    try:
        done = subprocess.run([SFC, "transcribe", str(tiny_export), "-"], stdin=slave,
                              capture_output=True, check=False, env=dict(os.environ))
    finally:
        os.close(slave)
        os.close(master)
    _assert_user_error(done, "stdin is a terminal")


def _tree(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*"))


def test_eval_writes_json_only_where_asked(tiny_export: Path, tmp_path: Path) -> None:
    cache = Path(os.environ["SFC_CACHE"])
    before = _tree(tiny_export, cache, tmp_path)
    done = _sfc("eval", str(tiny_export), "--limit", "1", "--threads", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _tree(tiny_export, cache, tmp_path) == before

    # The spellings `sfc build` uses for its WER check are accepted here too.
    target = tmp_path / "out" / "eval.json"
    done = _sfc("eval", str(tiny_export), "--eval-data", str(EVAL_DATA), "--eval-limit", "1",
                "--threads", "1", "--json", str(target), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = EvalResult.load(target)
    assert result.data == str(EVAL_DATA)
    assert [u.id for u in result.utterances] == [read_manifest(EVAL_DATA)[0].id]
    assert _tree(tiny_export, cache) == [p for p in before if tmp_path not in p.parents]


def test_build_accepts_the_shared_spellings(tmp_path: Path) -> None:
    """Every run stops at a later one-line check, so each spelling before it was parsed:
    an unknown option would be a usage error of several lines instead."""
    out = str(tmp_path / "b")
    for eval_opt in ("--eval-data", "--eval"):
        _assert_user_error(_sfc("build", "-o", out, eval_opt, str(EVAL_DATA), "--weights", "3"),
                           "--weights must be")
    # int4 and 8 are valid spellings: the build stops at the budget check after them.
    _assert_user_error(_sfc("build", "-o", out, "--weights", "int4", "--activations", "8",
                            "--avg-bits", "4"), "--weights mixed only")
    _assert_user_error(_sfc("build", "-o", out, "--activations", "8bit"), "--activations")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args", [
    ("build", "--calib-limit", "0"), ("build", "--eval-limit", "-1"), ("build", "--seed", "-1"),
    ("build", "--threads", "0"), ("eval", "x", "--limit", "0"), ("eval", "x", "--limit", "-3"),
    ("eval", "x", "--seed", "-2"), ("transcribe", "x", "y", "--seed", "-1"),
    ("transcribe", "x", "y", "--threads", "-1"),
])
def test_out_of_range_counts_are_refused_before_any_work(args: tuple[str, ...],
                                                         tmp_path: Path) -> None:
    """A negative limit once sliced the set from its end (`--limit -3`: 347 of 350 clips);
    0 failed only after calibration had started. Now each is a usage error naming the
    option, with no output folder made."""
    done = _sfc(*args, "-o", str(tmp_path / "b")) if args[0] == "build" else _sfc(*args)
    stderr = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in stderr, stderr
    assert f"'{args[-2]}'" in stderr.strip().splitlines()[-1], stderr
    assert not (tmp_path / "b").exists()
