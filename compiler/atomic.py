"""Write outputs so that nothing half-written ever sits under a final name.

Files are written to a temporary sibling and renamed into place; a failed run leaves
existing outputs untouched. A folder of outputs (a build, an export) is made in a staging
folder beside it and published in one step: on Linux the staging folder, completed with
links to the files of the old folder it does not replace, is swapped with the old folder
by one `renameat2(RENAME_EXCHANGE)`, so that a process killed at any instant (SIGKILL
included) leaves either the whole old folder or the whole new one. Where the swap is not
available (another OS, a file system without it, a mount point, the current directory)
the files are renamed into place one by one: each file is whole, the set may be mixed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import SfcError

__all__ = ["atomic_path", "file_lock", "staging_dir", "write_json_atomic",
           "write_text_atomic"]

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # renameat2(2), Linux >= 3.15
# The swap is refused on this file system or OS: fall back to renaming file by file.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.EBUSY, errno.ENOTSUP,
                errno.EPERM}
_INNER = ".stage-"  # the per-file fallback's staging folders, inside the output folder


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary shared files
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(final: Path, text: str) -> None:
    """Write `text` to `final` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(final: Path, data: Any) -> None:
    """Write `data` as stable, indented JSON to `final` atomically."""
    write_text_atomic(final, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def file_lock(path: Path, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive advisory lock (`flock`) on `path`: a folder, or a file created if
    missing. Where another process holds it, log `waiting` once and wait; the lock goes
    with its process, so a killed holder never leaves it taken."""
    import fcntl

    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                logger.warning(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


def _exchange(a: Path, b: Path) -> None:
    """Swap paths `a` and `b` in one step; OSError where the system cannot."""
    call = _renameat2()
    if call is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if call(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _new_stage(parent: Path, prefix: str) -> Path:
    """A new folder `<prefix><pid>-<random>` in `parent` (mode from the umask, as any
    folder the user makes)."""
    while True:
        stage = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            stage.mkdir()
            return stage
        except FileExistsError:
            continue


def _sweep(parent: Path, prefix: str) -> None:
    """Remove staging folders in `parent` left by processes that no longer run (a build
    killed before it could clean up)."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            pid = entry.name.removeprefix(prefix).split("-")[0]
            if entry.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


def _link_missing(old: Path, new: Path) -> None:
    """Give `new` a hard link (a copy where links fail) to each file of `old` it lacks:
    the published folder keeps what the old one held and the new outputs do not replace."""
    for entry in os.scandir(old):
        target = new / entry.name
        if entry.name.startswith(_INNER):
            continue  # a staging folder of the per-file fallback, not an output
        if entry.is_dir(follow_symlinks=False):
            if not target.exists() and not target.is_symlink():
                target.mkdir()
                shutil.copymode(entry.path, target)
            if target.is_dir() and not target.is_symlink():
                _link_missing(Path(entry.path), target)
        elif not target.exists() and not target.is_symlink():
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
                continue
            try:
                os.link(entry.path, target)
            except OSError:
                shutil.copy2(entry.path, target)


def _move_files(stage: Path, out_dir: Path) -> None:
    """The fallback: rename each staged file into `out_dir` (each whole, the set not)."""
    for src in sorted(stage.rglob("*")):
        if src.is_file():
            dst = out_dir / src.relative_to(stage)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)


def _publish(stage: Path, out_dir: Path) -> None:
    """Make `stage` the content of `out_dir` (see the module doc); `stage` is emptied or
    removed."""
    try:
        os.rename(stage, out_dir)  # no folder yet (or an empty one): a plain rename
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    _link_missing(out_dir, stage)
    shutil.copymode(out_dir, stage)
    try:
        _exchange(stage, out_dir)
    except OSError as exc:
        if exc.errno not in _NO_EXCHANGE:
            raise
        _move_files(stage, out_dir)


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success its files become `out_dir`'s, in one step
    where the system allows (module doc), beside the files of `out_dir` it does not replace.

    A failed or interrupted run changes nothing in `out_dir` (nor makes it); staging
    folders of killed runs are removed by the next run into the same folder.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise SfcError(f"{out_dir} exists and is not a folder")
    if not out_dir.parent.is_dir():
        out_dir.parent.mkdir(parents=True)
    beside = f".{out_dir.name}.stage-"
    # A folder holding the current directory (or a mount point) cannot be swapped away.
    in_place = Path.cwd().is_relative_to(out_dir) or out_dir.is_mount()
    if in_place:
        out_dir.mkdir(exist_ok=True)
        _sweep(out_dir, _INNER)
        stage = _new_stage(out_dir, _INNER)
    else:
        _sweep(out_dir.parent, beside)
        stage = _new_stage(out_dir.parent, beside)
    try:
        yield stage
        # The parent is locked (a folder, so no lock file is left beside the outputs):
        # two runs publishing into one folder take turns.
        with file_lock(out_dir.parent, f"waiting for another sfc process writing {out_dir}"):
            (_move_files if in_place else _publish)(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
