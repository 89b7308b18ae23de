"""Benchmarks on another machine over SSH: the same worker, run there by `SshDevice`.

`SshDevice` is a `Device`: `stage` copies a file or folder into a content-addressed cache on
the device (`staging.upload`), `run_worker` runs ``python3 -m sfc.bench.worker ...`` there
(or inside a Docker image) with its stderr streamed to the local console, and `describe`
is a remote describe worker; the runner builds and renders the report locally as for
`cpu`. Each call opens its own SSH connection (asyncssh), so no state outlives it.

Host keys are checked against known_hosts unless explicitly turned off; keys come from the
agent, ssh's defaults or a given file; every remote word is shell-quoted. A job on the
device never outlives its connection: it runs under a small watchdog that stops it when the
channel's stdin closes, which sshd does when the connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from ..errors import SfcError
from .devices import DEFAULT_TIMEOUT_S, WORKER_MODULE, available_devices, describe_device
from .staging import Upload, upload

__all__ = ["DEFAULT_REMOTE_CACHE", "SshDevice", "remote_command"]

T = TypeVar("T")

# Relative paths over SFTP start at the login directory: this is ~/.cache/sfc/remote.
DEFAULT_REMOTE_CACHE = ".cache/sfc/remote"
# A dead link is noticed after about 45 s without an answer, not at TCP's minutes.
_KEEPALIVE_S, _KEEPALIVE_COUNT = 15, 3

# Runs on the device (stdlib only): starts the command with its own stdin on /dev/null and
# terminates it when our stdin (the SSH channel, never closed by the client while the job
# runs) reaches EOF. os.read, not sys.stdin: a daemon thread blocked in a buffered read can
# abort the interpreter's shutdown. Exit codes follow the shell: 127 not found, 128+signal.
_WATCHDOG = """\
import os, subprocess, sys, threading
try:
    p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
except OSError as e:
    print(f"{sys.argv[1]}: {e.strerror}", file=sys.stderr)
    sys.exit(127)
def watch():
    while os.read(0, 65536):
        pass
    p.terminate()
threading.Thread(target=watch, daemon=True).start()
r = p.wait()
sys.exit(r if r >= 0 else 128 - r)
"""


def remote_command(python: Sequence[str], command: Sequence[str]) -> str:
    """The shell line that runs `command` on the device under the watchdog, each word quoted.

    `python` runs the watchdog (any Python 3 on the device). The line is POSIX-shell quoted,
    which the usual login shells (sh, bash, zsh, dash) read alike.
    """
    return shlex.join([*python, "-c", _WATCHDOG, *command])


def _print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", "") or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class _Session:
    conn: asyncssh.SSHClientConnection
    sftp: asyncssh.SFTPClient
    cache: str  # absolute path of the cache folder on the device


@dataclass(frozen=True)
class SshDevice:
    """A device reached over SSH (`host` is "host" or "user@host").

    `kind` is the device type the worker benchmarks there ("cpu", ...). `key`: a private key
    file (else the agent and ssh's default keys). `known_hosts`: the file to check the host
    key against (default ~/.ssh/known_hosts); `check_host_key=False` accepts any key (labs
    and tests only). `python`: the interpreter (and leading arguments) with sfc on the
    device; with `docker_image` the worker runs in that image instead (``docker run`` plus
    `docker_args`, e.g. ``--runtime nvidia``), the host's `python` only running the watchdog.
    `cache`: the device folder artifacts are copied into (relative: to the login
    directory). `echo` receives each stderr line of a remote run as it arrives.
    """

    host: str
    kind: str = "cpu"
    port: int | None = None
    key: Path | None = None
    known_hosts: Path | None = None
    check_host_key: bool = True
    python: tuple[str, ...] = ("python3",)
    docker_image: str | None = None
    docker_args: tuple[str, ...] = ()
    cache: str = DEFAULT_REMOTE_CACHE
    connect_timeout_s: float = 20.0
    echo: Callable[[str], None] = field(default=_print_stderr, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.hostname:
            raise SfcError(f"no host name in {self.host!r} (use HOST or USER@HOST)")
        if self.kind not in available_devices():
            raise SfcError(f"unknown device {self.kind!r}; choose from "
                           f"{', '.join(available_devices())}")
        if not self.python:
            raise SfcError("the remote Python command is empty")

    @property
    def hostname(self) -> str:
        """The host without the user."""
        return self.host.rpartition("@")[2]

    @property
    def where(self) -> str:
        """USER@HOST[:PORT], as messages name it."""
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def name(self) -> str:
        """Recorded in reports: the device type and the host ("cpu@jetson.local")."""
        return f"{self.kind}@{self.hostname}"

    def _options(self) -> dict[str, Any]:
        # asyncssh reads () as "its default": ssh config, agent, ~/.ssh keys and known_hosts;
        # known_hosts=None is its "accept any host key".
        known_hosts: object = None
        if self.check_host_key:
            known_hosts = str(self.known_hosts) if self.known_hosts else ()
        user = self.host.rpartition("@")[0]
        return {
            "username": user or (), "port": self.port or (),
            "client_keys": [str(self.key)] if self.key else (), "known_hosts": known_hosts,
            "connect_timeout": self.connect_timeout_s,
            "keepalive_interval": _KEEPALIVE_S, "keepalive_count_max": _KEEPALIVE_COUNT,
        }

    def _dropped(self, reason: str) -> SfcError:
        return SfcError(f"connection to {self.where} dropped ({reason}); nothing it ran is "
                        "left running on the device, and an interrupted copy resumes next time")

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[_Session]:
        """One connection with SFTP and the cache folder made; SSH errors as one line."""
        if self.key is not None and not self.key.is_file():
            raise SfcError(f"SSH key not found: {self.key}")
        try:
            conn = await asyncssh.connect(self.hostname, **self._options())
        except asyncssh.PermissionDenied as exc:
            raise SfcError(f"SSH authentication to {self.where} failed ({_reason(exc)}): load "
                           "your key into ssh-agent or give the key file") from None
        except asyncssh.HostKeyNotVerifiable as exc:
            known = self.known_hosts or "~/.ssh/known_hosts"
            raise SfcError(f"host key of {self.where} is not trusted ({_reason(exc)}): add it "
                           f"to {known} (connect once with ssh) or turn host-key checking "
                           "off for a lab machine") from None
        except asyncssh.KeyImportError as exc:
            raise SfcError(f"cannot read SSH key {self.key}: {_reason(exc)}") from None
        except (OSError, asyncssh.Error) as exc:
            raise SfcError(f"cannot reach {self.where}: {_reason(exc)}") from None
        try:
            async with conn, conn.start_sftp_client() as sftp:
                await sftp.makedirs(self.cache, exist_ok=True)
                yield _Session(conn, sftp, await sftp.realpath(self.cache))
        except (asyncssh.DisconnectError, asyncssh.SFTPConnectionLost,
                asyncssh.SFTPNoConnection, ConnectionError) as exc:
            raise self._dropped(_reason(exc)) from None
        except asyncssh.SFTPError as exc:
            raise SfcError(f"file transfer to {self.where} failed: {_reason(exc)}") from None

    def _call(self, job: Callable[[_Session], Awaitable[T]]) -> T:
        async def main() -> T:
            async with self._session() as session:
                return await job(session)

        return asyncio.run(main())

    async def _run(self, conn: asyncssh.SSHClientConnection, words: Sequence[str],
                   timeout_s: float | None) -> subprocess.CompletedProcess[str]:
        command = remote_command(self.python, words)
        # stdin stays open until the connection closes: its EOF is the watchdog's signal.
        proc = await conn.create_process(command, encoding="utf-8", errors="replace")

        async def stream_stderr() -> str:
            lines = []
            async for line in proc.stderr:
                lines.append(line)
                if line.strip():
                    self.echo(f"[{self.hostname}] {line.rstrip()}")
            return "".join(lines)

        async def collect() -> tuple[str, str, int | None]:
            out, err = await asyncio.gather(proc.stdout.read(), stream_stderr())
            return out, err, (await proc.wait()).exit_status

        try:
            out, err, status = await asyncio.wait_for(collect(), timeout_s)
        except TimeoutError:
            raise SfcError(f"remote run on {self.where} timed out after {timeout_s:.0f} s; "
                           "it was stopped on the device") from None
        if status is None:  # the channel closed without an exit status
            raise self._dropped("no exit status")
        return subprocess.CompletedProcess(list(words), status, out, err)

    def run(self, words: Sequence[str], *, timeout_s: float | None = DEFAULT_TIMEOUT_S
            ) -> subprocess.CompletedProcess[str]:
        """Run `words` on the device; stderr streams to `echo`, stdout comes back."""
        return self._call(lambda s: self._run(s.conn, words, timeout_s))

    def worker_command(self, argv: Sequence[str], cache: str) -> list[str]:
        """The worker's command on the device; `cache` (absolute) is mounted into Docker."""
        if self.docker_image is None:
            return [*self.python, "-m", WORKER_MODULE, *argv]
        # --init: the image's Python is not PID 1, which would ignore the watchdog's SIGTERM.
        return ["docker", "run", "--rm", "--init", "--network=none", "--entrypoint", "python3",
                "-v", f"{cache}:{cache}:ro", *self.docker_args, self.docker_image,
                "-m", WORKER_MODULE, *argv]

    def _check_started(self, done: subprocess.CompletedProcess[str]) -> None:
        """One-line errors for a worker that could not start on the device."""
        if done.returncode == 0:
            return
        last = (done.stderr.strip().splitlines() or [""])[-1]
        if done.returncode == 127:
            raise SfcError(f"cannot start the worker on {self.where}: {last or 'not found'}")
        if "No module named 'sfc'" in done.stderr:
            where = f"image {self.docker_image}" if self.docker_image else " ".join(self.python)
            raise SfcError(f"sfc is not installed on {self.where} ({where}): install it there "
                           "or name the Python that has it")

    def run_worker(self, argv: Sequence[str], *, timeout_s: float | None = DEFAULT_TIMEOUT_S
                   ) -> subprocess.CompletedProcess[str]:
        """Run the benchmark worker on the device."""
        done = self._call(lambda s: self._run(s.conn, self.worker_command(argv, s.cache),
                                              timeout_s))
        self._check_started(done)
        return done

    def upload(self, path: Path) -> Upload:
        """Copy `path` into the device's cache unless it is there; what was sent."""
        return self._call(lambda s: upload(s.sftp, Path(path), s.cache, where=self.where))

    def stage(self, path: Path) -> str:
        """`path` on the device (copied there by content)."""
        return self.upload(path).remote

    def describe(self) -> dict[str, Any]:
        """The device as a describe worker of `kind` reports it there."""
        return describe_device(self)
