"""A real SSH server on loopback for the remote-bench tests and benchmark: asyncssh's.

`LoopbackSshd` authenticates one key pair it makes, runs each requested command in a local
shell the way sshd does (the "device" is this machine, so the worker really runs: at the
other end of a real SSH connection) in its own login directory `home`, and serves SFTP on
the local file system with relative paths starting at `home`, as sshd's do. Its `knobs`
fake a small disk, a disk that fills during a copy, or a connection cut during a copy or a
run. Like sshd, it closes the command's stdin when the connection goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import subprocess
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncssh

__all__ = ["Knobs", "LoopbackSshd", "pids_with"]

# Errors of a stream whose connection was cut on purpose.
_CUT = (OSError, asyncssh.Error)


@dataclass
class Knobs:
    """What the server fakes. `write_limit`: bytes written over SFTP before the next write
    `on_limit`s: "drop" cuts the connection, "full" fails it and reports no free space,
    "fail" fails it with space left. `free`: the free bytes statvfs reports (None: real).
    `drop_marker`: cut the connection once a worker whose command line holds it runs."""

    write_limit: int | None = None
    on_limit: str = "drop"
    written: int = 0
    free: int | None = None
    drop_marker: str | None = None


def pids_with(marker: str) -> dict[int, list[str]]:
    """Live processes whose command line contains `marker`: pid -> argv (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(marker in a for a in argv):
                found[int(entry.name)] = argv
    return found


class _Sftp(asyncssh.SFTPServer):
    def __init__(self, chan: Any, knobs: Knobs, home: Path) -> None:
        super().__init__(chan)
        self.knobs = knobs
        self.home = os.fsencode(home)

    def map_path(self, path: bytes) -> bytes:
        # Relative to the login directory, as sshd's SFTP (asyncssh's: the server's cwd).
        return posixpath.join(self.home, path)

    def write(self, file_obj: object, offset: int, data: bytes) -> Any:
        k = self.knobs
        if k.write_limit is not None and k.written + len(data) > k.write_limit:
            room = max(k.write_limit - k.written, 0)
            super().write(file_obj, offset, data[:room])
            k.written += room
            if k.on_limit == "drop":
                self.connection.abort()
            elif k.on_limit == "full":
                k.free = 0
            raise asyncssh.SFTPFailure("Failure")  # what OpenSSH says for ENOSPC (SFTP v3)
        k.written += len(data)
        return super().write(file_obj, offset, data)

    def statvfs(self, path: bytes) -> Any:
        if self.knobs.free is None:
            return super().statvfs(path)
        return asyncssh.SFTPVFSAttrs(bsize=4096, frsize=1, bfree=self.knobs.free,
                                     bavail=self.knobs.free)


class LoopbackSshd:
    """asyncssh's server on 127.0.0.1 (a free port) in a thread with its own event loop.

    Under `root` (which must exist) it makes `home` (the login directory), `key` (the client's
    private key, the only one accepted) and `known_hosts` (the server's host key, for
    ``[127.0.0.1]:port``). Any user name is accepted with that key.
    """

    def __init__(self, root: Path) -> None:
        self.home = (root / "home").resolve()
        self.home.mkdir()
        self.knobs = Knobs()
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.key = root / "id_ed25519"
        client_key.write_private_key(str(self.key))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())

        async def start() -> Any:
            return await asyncssh.create_server(
                asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key],
                authorized_client_keys=authorized, process_factory=self._handle,
                sftp_factory=lambda chan: _Sftp(chan, self.knobs, self.home), encoding=None)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.port: int = self.server.sockets[0].getsockname()[1]
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(
            f"[127.0.0.1]:{self.port} {host_key.export_public_key().decode()}")

    def reset(self) -> None:
        """Every knob back to its default (a real, healthy server)."""
        for f in fields(Knobs):
            setattr(self.knobs, f.name, getattr(Knobs(), f.name))

    async def _handle(self, process: Any) -> None:
        if not process.command:
            process.exit(1)
            return
        proc = await asyncio.create_subprocess_shell(
            process.command, cwd=self.home, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
        assert stdin is not None and stdout is not None and stderr is not None

        async def pump_in() -> None:
            with contextlib.suppress(*_CUT):
                async for chunk in process.stdin:
                    stdin.write(chunk)
            stdin.close()  # the channel ended (EOF or a lost connection), as in sshd

        async def pump_out(src: asyncio.StreamReader, dst: Any) -> None:
            with contextlib.suppress(*_CUT):
                while data := await src.read(65536):
                    dst.write(data)

        async def drop_when_running(marker: str) -> None:
            while not any(argv[1:2] == ["-m"] for argv in pids_with(marker).values()):
                await asyncio.sleep(0.05)
            process.channel.get_connection().abort()

        watcher = None
        if self.knobs.drop_marker and self.knobs.drop_marker in process.command:
            watcher = asyncio.ensure_future(drop_when_running(self.knobs.drop_marker))
        feeder = asyncio.ensure_future(pump_in())
        await asyncio.gather(pump_out(stdout, process.stdout), pump_out(stderr, process.stderr))
        code = await proc.wait()
        for task in (watcher, feeder):
            if task is not None:
                task.cancel()
        with contextlib.suppress(*_CUT):
            process.exit(code)

    def close(self) -> None:
        """Stop the server and its thread."""
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def __enter__(self) -> LoopbackSshd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
