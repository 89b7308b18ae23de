"""`SshDevice` against a real SSH server: asyncssh's, started by these tests on loopback
(`sshd.LoopbackSshd`: a key pair made here, commands run in a local shell, SFTP on the local
file system, knobs that fake a full disk or a dropped connection)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import numpy as np
import onnx
import pytest
from sshd import LoopbackSshd, pids_with
from test_bench import tiny_model

from sfc.bench import BenchReport, bench, render
from sfc.bench.remote import DEFAULT_REMOTE_CACHE, SshDevice, remote_command
from sfc.bench.results import WorkerArgs
from sfc.bench.staging import manifest
from sfc.errors import SfcError

FAST = {"runs": 10, "warmup": 1, "rounds": 1, "threads": 1, "dims": {"batch": 32},
        "progress": False}
# Whether a job is still running is read from /proc (Linux).
needs_proc = pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="needs /proc")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSshd]:
    with LoopbackSshd(tmp_path_factory.mktemp("ssh")) as srv:
        yield srv


@pytest.fixture
def ssh(server: LoopbackSshd) -> LoopbackSshd:
    server.reset()
    return server


def _device(srv: LoopbackSshd, cache: Path, **kw: Any) -> SshDevice:
    opts: dict[str, Any] = {"port": srv.port, "key": srv.key, "known_hosts": srv.known_hosts,
                            "python": (sys.executable,), "cache": str(cache)}
    return SshDevice(f"{getpass.getuser()}@127.0.0.1", **(opts | kw))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bench tests' model, saved under a name that shells would expand."""
    path = tmp_path_factory.mktemp("art") / "it's $(touch PWNED) tiny.onnx"
    onnx.save(tiny_model(), str(path))
    return path


def _wait_gone(marker: str, deadline_s: float = 30.0) -> dict[int, list[str]]:
    """Processes still holding `marker` once they are all gone or the deadline passes."""
    end = time.monotonic() + deadline_s
    while (left := pids_with(marker)) and time.monotonic() < end:
        time.sleep(0.1)
    return left


# --- end to end --------------------------------------------------------------------------------

def test_remote_bench_matches_local(ssh: LoopbackSshd, tiny: Path, tmp_path: Path) -> None:
    cache = tmp_path / "remote cache"
    dev = _device(ssh, cache)
    remote = bench([tiny], baseline=tiny, device=dev, **FAST)
    local = bench([tiny], baseline=tiny, device="cpu", **FAST)

    assert remote.device == "cpu@127.0.0.1" and local.device == "cpu"
    assert [v.label for v in remote.variants] == [v.label for v in local.variants]
    for r, lo in zip(remote.variants, local.variants, strict=True):
        assert (r.kind, r.bytes, r.artifact) == (lo.kind, lo.bytes, lo.artifact)
        assert len(r.rounds) == len(lo.rounds) == 1
        assert len(r.rounds[0].latency_ms) == len(lo.rounds[0].latency_ms) == FAST["runs"]
        assert r.latency.p50 > 0 and r.peak_rss_kib > 0
        # The worker ran the copy in the device's cache, not the local file.
        assert r.rounds[0].artifact.startswith(str(cache)) and r.rounds[0].artifact.endswith(
            tiny.name)
    assert remote.variants[0].ratio == 1.0 and remote.variants[1].ratio is not None
    assert set(remote.device_info) == set(local.device_info)
    assert remote.device_info["cpu"] == local.device_info["cpu"]  # the same machine
    assert [c.header for c in render(remote).columns] == [c.header for c in render(local).columns]
    assert render(remote).row_count == render(local).row_count == 2
    remote.save(tmp_path / "remote.json")
    assert BenchReport.load(tmp_path / "remote.json") == remote
    # Every remote word was quoted: the file name's $(...) ran nowhere.
    assert not (ssh.home / "PWNED").exists() and not Path("PWNED").exists()


def test_stderr_streams_while_the_job_runs(ssh: LoopbackSshd, tmp_path: Path) -> None:
    """The job waits for a file that only the streamed "ready" line creates: it can end
    well only if its stderr reached us while it was still running."""
    flag = tmp_path / "seen"

    def echo(line: str) -> None:
        if line.endswith("ready"):
            flag.touch()

    dev = _device(ssh, tmp_path / "c", echo=echo)
    script = ("import pathlib, sys, time\n"
              "print('ready', file=sys.stderr, flush=True)\n"
              "for _ in range(600):\n"
              "    if pathlib.Path(sys.argv[1]).exists(): print('done'); sys.exit(0)\n"
              "    time.sleep(0.1)\n"
              "sys.exit(3)\n")
    done = dev.run([sys.executable, "-c", script, str(flag)])
    assert (done.returncode, done.stdout) == (0, "done\n")
    assert done.stderr == "ready\n"


# --- staging ----------------------------------------------------------------------------------

def _folder(root: Path) -> Path:
    art = root / "build"
    (art / "encoder").mkdir(parents=True)
    (art / "card.json").write_text('{"name": "x"}')
    (art / "encoder" / "model.onnx").write_bytes(np.random.default_rng(1).bytes(300_000))
    return art


def _same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    other = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files == other and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_stage_copies_by_content_once(ssh: LoopbackSshd, tmp_path: Path) -> None:
    art = _folder(tmp_path)
    dev = _device(ssh, tmp_path / "cache")
    first = dev.upload(art)
    assert first.files_sent == 2 and first.bytes_sent == manifest(art).size
    assert Path(first.remote).name == "build" and _same_tree(art, Path(first.remote))
    again = dev.upload(art)
    assert (again.remote, again.bytes_sent, again.files_sent) == (first.remote, 0, 0)
    (art / "card.json").write_text('{"name": "y"}')  # new content, new address
    changed = dev.upload(art)
    assert changed.remote != first.remote and changed.bytes_sent == manifest(art).size
    assert _same_tree(art, Path(changed.remote))


def test_default_cache_is_under_the_login_directory(ssh: LoopbackSshd, tmp_path: Path) -> None:
    """The CLI's relative cache lands in the login directory, where commands also run (as
    with sshd), not in the server's working directory."""
    dev = _device(ssh, Path(DEFAULT_REMOTE_CACHE))
    up = dev.upload(_folder(tmp_path))
    assert Path(up.remote).is_relative_to(ssh.home / DEFAULT_REMOTE_CACHE)
    assert _same_tree(tmp_path / "build", Path(up.remote))
    cwd = dev.run([sys.executable, "-c", "import os; print(os.getcwd())"]).stdout
    assert Path(cwd.strip()) == ssh.home


def test_manifest_addresses_content_and_name(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a")
    b = _folder(tmp_path / "b")
    assert manifest(a).digest == manifest(b).digest  # same name and bytes, other place
    shutil.copytree(b, tmp_path / "b" / "other")
    assert manifest(tmp_path / "b" / "other").digest != manifest(b).digest
    (b / "encoder" / "model.onnx").write_bytes(b"\0" * 300_000)
    assert manifest(a).digest != manifest(b).digest
    with pytest.raises(SfcError, match="nothing to copy"):
        manifest(tmp_path / "none")


def test_interrupted_copy_resumes(ssh: LoopbackSshd, tmp_path: Path) -> None:
    art = tmp_path / "big.bin"
    art.write_bytes(np.random.default_rng(2).bytes(3_000_000))
    cache = tmp_path / "cache"
    ssh.knobs.write_limit, ssh.knobs.on_limit = 1_200_000, "drop"
    with pytest.raises(SfcError, match=r"^connection to .*127\.0\.0\.1:\d+ dropped \(.*\); "):
        _device(ssh, cache).upload(art)
    (part,) = cache.glob("*.part/big.bin")
    kept = part.stat().st_size
    assert 0 < kept < art.stat().st_size
    ssh.knobs.write_limit = None
    done = _device(ssh, cache).upload(art)
    assert done.bytes_sent == art.stat().st_size - kept
    assert Path(done.remote).read_bytes() == art.read_bytes()
    assert not list(cache.glob("*.part"))


def test_disk_full_is_found_before_copying(ssh: LoopbackSshd, tmp_path: Path) -> None:
    art = _folder(tmp_path)
    cache = tmp_path / "cache"
    ssh.knobs.free = 1000
    with pytest.raises(SfcError) as err:
        _device(ssh, cache).upload(art)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("not enough space on ")
    assert str(err.value).endswith(f"to copy into {cache}, 1000 bytes free")
    assert ssh.knobs.written == 0 and not any(p.is_file() for p in cache.rglob("*"))


@pytest.mark.parametrize(("on_limit", "message"), [
    ("full", r"^disk full on .* while copying build/encoder/model\.onnx: 0 bytes free, "),
    ("fail", r"^copying build/encoder/model\.onnx to .* failed: Failure$"),
])
def test_failed_write(ssh: LoopbackSshd, tmp_path: Path, on_limit: str, message: str) -> None:
    ssh.knobs.write_limit, ssh.knobs.on_limit = 100_000, on_limit
    with pytest.raises(SfcError, match=message):
        _device(ssh, tmp_path / "cache").upload(_folder(tmp_path))


# --- failures of the connection and the device ------------------------------------------------

def test_wrong_key_is_an_auth_failure(ssh: LoopbackSshd, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(other))
    with pytest.raises(SfcError, match=r"^SSH authentication to .*@127\.0\.0\.1:\d+ failed "
                                       r"\(.+\): load your key into ssh-agent"):
        _device(ssh, tmp_path / "c", key=other).describe()
    with pytest.raises(SfcError, match=r"^SSH key not found: "):
        _device(ssh, tmp_path / "c", key=tmp_path / "missing").describe()


def test_closed_port_is_unreachable(tmp_path: Path, server: LoopbackSshd) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SfcError, match=rf"^cannot reach .*127\.0\.0\.1:{port}: .+"):
        _device(server, tmp_path / "c", port=port).describe()


def test_unknown_host_key(ssh: LoopbackSshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(SfcError, match=rf"^host key of .*127\.0\.0\.1:{ssh.port} is not "
                                       rf"trusted \(.+\): add it to {empty} "):
        _device(ssh, tmp_path / "c", known_hosts=empty).describe()
    # Checking off (labs, tests): the same server is accepted.
    dev = _device(ssh, tmp_path / "c", known_hosts=empty, check_host_key=False)
    assert dev.run([sys.executable, "-c", "print('ok')"]).stdout == "ok\n"


def test_missing_sfc_on_the_device(ssh: LoopbackSshd, tmp_path: Path) -> None:
    # -S: no site-packages, so no sfc (the worker's own imports fail first).
    without = _device(ssh, tmp_path / "c", python=(sys.executable, "-S"))
    with pytest.raises(SfcError, match=r"^sfc is not installed on .*127\.0\.0\.1:\d+ "
                                       r"\(.* -S\): install it there"):
        without.describe()
    nothing = _device(ssh, tmp_path / "c", python=("sfc-no-such-python3",))
    with pytest.raises(SfcError, match=r"^cannot start the worker on .*: .*not found"):
        nothing.describe()


@needs_proc
def test_dropped_connection_stops_the_remote_job(ssh: LoopbackSshd, tiny: Path,
                                                  tmp_path: Path) -> None:
    cache = tmp_path / "drop-cache"
    dev = _device(ssh, cache)
    staged = dev.stage(tiny)
    marker = str(cache)
    ssh.knobs.drop_marker = marker
    endless = WorkerArgs(artifact=staged, runs=10**9, warmup=0, threads=1, dims={"batch": 1})
    with pytest.raises(SfcError, match=r"^connection to .* dropped \(.+\); nothing it ran is "
                                       r"left running on the device"):
        dev.run_worker(endless.argv())
    assert _wait_gone(marker) == {}


@needs_proc
def test_timeout_stops_the_remote_job(ssh: LoopbackSshd, tmp_path: Path) -> None:
    marker = f"sfc-test-sleeper-{tmp_path.name}"
    dev = _device(ssh, tmp_path / "c")
    with pytest.raises(SfcError, match=r"timed out after 1 s; it was stopped on the device"):
        dev.run([sys.executable, "-c", "import time; time.sleep(600)", marker], timeout_s=1)
    assert _wait_gone(marker) == {}


# --- pure pieces ------------------------------------------------------------------------------

def test_remote_command_quotes_every_word(tmp_path: Path) -> None:
    words = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "a b", "$(touch X)",
             "it's", "*", "; touch Y"]
    line = remote_command((sys.executable,), words)
    # stdin open as over SSH (the watchdog stops the job when it closes).
    with subprocess.Popen(["sh", "-c", line], cwd=tmp_path, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        out = proc.stdout.read()
        assert proc.wait() == 0
    assert out.strip() == repr(words[3:])
    assert not list(tmp_path.iterdir())  # neither X nor Y was made


def test_watchdog_stops_the_job_when_stdin_closes() -> None:
    line = remote_command((sys.executable,), [sys.executable, "-c", "import time; time.sleep(600)"])
    done = subprocess.run(["sh", "-c", line], stdin=subprocess.DEVNULL, check=False, timeout=60)
    assert done.returncode == 128 + 15  # SIGTERM, as a shell reports it


def test_docker_worker_command() -> None:
    dev = SshDevice("u@h", docker_image="sfc:jetson", docker_args=("--runtime", "nvidia"))
    cmd = dev.worker_command(["--json-args", "{}"], "/home/u/cache")
    assert cmd[:3] == ["docker", "run", "--rm"] and "--init" in cmd
    assert cmd[cmd.index("-v") + 1] == "/home/u/cache:/home/u/cache:ro"
    image = cmd.index("sfc:jetson")
    assert cmd[image - 2:image] == ["--runtime", "nvidia"]
    assert cmd[image + 1:] == ["-m", "sfc.bench.worker", "--json-args", "{}"]
    assert dev.name == "cpu@h" and dev.where == "u@h"


def test_device_settings_are_checked() -> None:
    with pytest.raises(SfcError, match="no host name"):
        SshDevice("u@")
    with pytest.raises(SfcError, match="unknown device 'tpu'"):
        SshDevice("h", kind="tpu")
    with pytest.raises(SfcError, match="remote Python command is empty"):
        SshDevice("h", python=())
