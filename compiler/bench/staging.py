"""Copy an artifact to a device by content: named by sha256, resumable, skipped when there.

An artifact (a file or a folder) is identified by the sha256 of its manifest (its name and
every file's relative path, size and sha256). On the device it lives at
``<cache>/<digest>/<name>``; a copy in progress lives at ``<cache>/<digest>.part/`` and is
renamed into place when complete, so a finished digest folder is always whole and a later
upload of unchanged files copies nothing. A part folder only ever holds prefixes of the
files its digest names, so an interrupted copy resumes from each part file's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from ..errors import SfcError

__all__ = ["Manifest", "Upload", "manifest", "upload"]

logger = logging.getLogger(__name__)

# Largest write per request. Each write is awaited before the next is sent: asyncssh
# pipelines larger writes, and requests completing out of order could leave a hole below
# a part file's size, which resuming from that size would then keep.
_CHUNK = 1 << 20
# Errors that mean the connection went, not the device's disk: the caller reports those.
_CONNECTION_ERRORS = (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection)


@dataclass(frozen=True)
class Manifest:
    """What an artifact holds: `files` are (path relative to the artifact's parent, bytes,
    sha256), so each path starts with `name`."""

    name: str
    files: tuple[tuple[str, int, str], ...]

    @property
    def digest(self) -> str:
        """sha256 of the name and every file's path, size and hash: the artifact's address."""
        text = json.dumps([self.name, self.files], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def size(self) -> int:
        """Bytes of all files."""
        return sum(size for _, size, _ in self.files)


def manifest(path: Path) -> Manifest:
    """Hash `path` (a file, or every file under a folder, symlinks followed)."""
    path = Path(path).resolve()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        raise SfcError(f"nothing to copy at {path}")
    entries = []
    for f in files:
        h = hashlib.sha256()  # chunked by hand: hashlib.file_digest is Python 3.11+
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        entries.append((f.relative_to(path.parent).as_posix(), f.stat().st_size,
                        h.hexdigest()))
    return Manifest(name=path.name, files=tuple(entries))


@dataclass(frozen=True)
class Upload:
    """Where an artifact is on the device, and what this upload had to send."""

    remote: str
    bytes_sent: int
    files_sent: int


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


async def _remote_size(sftp: asyncssh.SFTPClient, path: str) -> int:
    try:
        return int((await sftp.stat(path)).size or 0)
    except asyncssh.SFTPNoSuchFile:
        return 0


async def _free_bytes(sftp: asyncssh.SFTPClient, path: str) -> int | None:
    """Bytes an unprivileged user may still write under `path` (None: server cannot say)."""
    try:
        vfs = await sftp.statvfs(path)
    except asyncssh.SFTPOpUnsupported:
        return None
    return int(vfs.bavail) * int(vfs.frsize)


async def _copy(sftp: asyncssh.SFTPClient, src: Path, dst: str, offset: int) -> int:
    """Write `src` from `offset` on into `dst` (kept up to `offset`); bytes sent."""
    chunk = min(_CHUNK, sftp.limits.max_write_len or _CHUNK)
    sent = 0
    async with sftp.open(dst, "r+b" if offset else "wb") as out:
        with src.open("rb") as fh:
            fh.seek(offset)
            while data := fh.read(chunk):
                await out.write(data, offset + sent)
                sent += len(data)
    return sent


async def upload(sftp: asyncssh.SFTPClient, local: Path, cache: str, *,
                 where: str) -> Upload:
    """Copy `local` into the device folder `cache` (absolute) unless it is already there.

    `where` names the device in messages. Raises SfcError when the device lacks the space
    (checked before copying, and again after a failed write) or a write fails.
    """
    local = Path(local).resolve()
    m = manifest(local)
    final = posixpath.join(cache, m.digest)
    remote = posixpath.join(final, m.name)
    if await sftp.isdir(final):
        return Upload(remote=remote, bytes_sent=0, files_sent=0)

    part = final + ".part"
    todo: list[tuple[str, int, int]] = []  # (relative path, size, bytes already there)
    for rel, size, _ in m.files:
        have = await _remote_size(sftp, posixpath.join(part, rel))
        if have != size:
            todo.append((rel, size, have if have < size else 0))
    remaining = sum(size - have for _, size, have in todo)
    free = await _free_bytes(sftp, cache)
    if free is not None and remaining > free:
        raise SfcError(f"not enough space on {where}: {_mb(remaining)} to copy into {cache}, "
                       f"{_mb(free)} free")

    logger.info("copying %s (%s) to %s:%s", m.name, _mb(remaining), where, final)
    await sftp.makedirs(part, exist_ok=True)
    sent = 0
    for rel, _, have in todo:
        dst = posixpath.join(part, rel)
        try:
            await sftp.makedirs(posixpath.dirname(dst), exist_ok=True)
            sent += await _copy(sftp, local.parent / rel, dst, have)
        except _CONNECTION_ERRORS:
            raise
        except (asyncssh.SFTPError, OSError) as exc:
            # SFTP v3 reports a full disk as a bare "Failure": ask the device how much is free.
            left = remaining - sent
            free = await _free_bytes(sftp, cache)
            if free is not None and free < left:
                raise SfcError(f"disk full on {where} while copying {rel}: {_mb(free)} free, "
                               f"{_mb(left)} still to copy into {cache}") from None
            raise SfcError(f"copying {rel} to {where}:{dst} failed: {exc}") from None
    try:
        await sftp.rename(part, final)
    except asyncssh.SFTPError:
        if not await sftp.isdir(final):  # else another upload of the same digest finished first
            raise
    return Upload(remote=remote, bytes_sent=sent, files_sent=len(todo))
