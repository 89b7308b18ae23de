"""`sfc bench` over SSH on loopback next to the same bench run locally; the failure messages.

Run from the repository root::

    python benchmarks/remote_loopback.py                  # whisper-tiny.en FP32, 5 runs x 3 rounds
    python benchmarks/remote_loopback.py --repeats 2      # local/remote, then remote/local
    python benchmarks/remote_loopback.py --artifact build/ --baseline whisper-tiny.en

What it does:

* starts a real SSH server on 127.0.0.1 (asyncssh's, the one tests/test_remote.py uses:
  a key pair and known_hosts made here, commands run in a local shell, so the "device" is
  this machine at the other end of a real SSH connection);
* runs the same bench twice, each through the real CLI in its own process:
  ``sfc bench ARTIFACT --baseline BASE --json local.json`` and the same with ``--host
  USER@127.0.0.1 --ssh-port P --ssh-key K --known-hosts KH`` (the artifacts are copied into
  the server's cache over SFTP and the worker runs there); with ``--repeats N`` the pair
  runs N times, local first in even repeats and remote first in odd ones;
* prints both tables (the CLI's own output) and, per variant, the ratio of the remote p50
  to the local p50 (each report's median over rounds; the median over repeats). It is
  within noise when it lies inside the local rounds' own p50 spread (the smallest and
  largest per-round p50 over the local median);
* then runs each failure case through the CLI against a second, fresh server (the disk
  checks need an artifact that is not copied yet) and records its exit status and its
  last stderr line (the CLI's one-line error): a wrong key, a closed port, an unknown host
  key with checking on, a remote Python without sfc, a disk too small before the copy,
  a disk that fills during the copy, and a connection dropped while the worker runs
  (then whether any remote job was left running).

``--baseline`` defaults to the artifact itself (a folder: the CLI takes a folder or a zoo
name), so both tables hold the same two variants, the second an identical copy whose
"x baseline" column shows the noise of a null comparison; for a Whisper build give its
FP32 export. The default artifact is whisper-tiny.en's FP32 export in ``$SFC_CACHE``
(exported on first use). The JSON (default ``benchmarks/results/remote_loopback.json``)
holds the machine (``sfc info --json``), the commands, both reports of every repeat, the
comparison and the failure cases.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import asyncssh
from common import print_table

from sfc.atomic import write_json_atomic
from sfc.bench.results import BenchReport, latency_stats
from sfc.bench.staging import manifest

REPO = Path(__file__).resolve().parents[1]
# The loopback server lives with the tests that use it; one implementation serves both.
sys.path.insert(0, str(REPO / "tests"))
from sshd import LoopbackSshd, pids_with  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "remote_loopback.json"
DEFAULT_MODEL = "whisper-tiny.en"
# The CLI of this interpreter (the `sfc` script may belong to another environment).
SFC = [sys.executable, "-m", "sfc.cli"]
# Wide enough for the bench table when stdout is not a terminal (rich's default is 80).
_COLUMNS = "160"


@dataclass(frozen=True)
class Ssh:
    """How the CLI reaches a server: the `--host` options."""

    host: str
    port: int
    key: Path
    known_hosts: Path
    python: str

    def args(self) -> list[str]:
        return ["--host", self.host, "--ssh-port", str(self.port), "--ssh-key", str(self.key),
                "--known-hosts", str(self.known_hosts), "--remote-python", self.python]


def ssh_to(server: LoopbackSshd) -> Ssh:
    """This user on `server`, the worker run by this interpreter (which has sfc)."""
    return Ssh(host=f"{getpass.getuser()}@127.0.0.1", port=server.port, key=server.key,
               known_hosts=server.known_hosts, python=shlex.join([sys.executable]))


def shown(argv: Sequence[str]) -> str:
    """A CLI command line as a user would type it."""
    words = list(argv)
    if words[:len(SFC)] == SFC:
        words = ["sfc", *words[len(SFC):]]
    return shlex.join(words)


def sfc(argv: Sequence[str], *, capture: bool) -> subprocess.CompletedProcess[str]:
    """Run the CLI in its own process (output passed through unless `capture`)."""
    env = dict(os.environ)
    if not sys.stdout.isatty():  # a terminal gives rich its own width
        env.setdefault("COLUMNS", _COLUMNS)
    return subprocess.run([*SFC, *argv], env=env, text=True, capture_output=capture,
                          check=False)


@dataclass(frozen=True)
class Comparison:
    """One variant's p50 locally and over SSH. `local_p50_ms` / `remote_p50_ms`: each
    repeat's report p50 (median over rounds); `ratio`: the median over repeats of remote /
    local; `noise`: the smallest and largest local per-round p50 over their median."""

    variant: str
    local_p50_ms: tuple[float, ...]
    remote_p50_ms: tuple[float, ...]
    ratio: float
    noise: tuple[float, float]

    @property
    def within_noise(self) -> bool:
        return self.noise[0] <= self.ratio <= self.noise[1]


def compare(local: Sequence[BenchReport], remote: Sequence[BenchReport]) -> list[Comparison]:
    """Per variant, the remote p50 against the local p50 (reports paired by repeat)."""
    out = []
    for v in local[0].variants:
        here = tuple(r.variant(v.label).latency.p50 for r in local)
        there = tuple(r.variant(v.label).latency.p50 for r in remote)
        rounds = [latency_stats(w.latency_ms).p50 for r in local
                  for w in r.variant(v.label).rounds]
        mid = statistics.median(rounds)
        out.append(Comparison(
            variant=v.label, local_p50_ms=here, remote_p50_ms=there,
            ratio=statistics.median(t / h for h, t in zip(here, there, strict=True)),
            noise=(min(rounds) / mid, max(rounds) / mid)))
    return out


def bench_args(args: argparse.Namespace, runs: int, rounds: int) -> list[str]:
    """`sfc bench`'s arguments but the device's and the JSON's."""
    out = ["bench", str(args.artifact), "--runs", str(runs), "--rounds", str(rounds)]
    if args.baseline is not None:
        out += ["--baseline", str(args.baseline)]
    if args.threads is not None:
        out += ["--threads", str(args.threads)]
    return out


def run_benches(args: argparse.Namespace, ssh: Ssh, work: Path) -> list[dict[str, Any]]:
    """Each repeat's local and remote bench (alternating which goes first)."""
    common = bench_args(args, args.runs, args.rounds)
    repeats = []
    for i in range(args.repeats):
        order = ("local", "remote") if i % 2 == 0 else ("remote", "local")
        done: dict[str, Any] = {"repeat": i, "order": list(order)}
        for where in order:
            out = work / f"{where}-{i}.json"
            argv = [*common, *(ssh.args() if where == "remote" else []), "--json", str(out)]
            print(f"\n== repeat {i + 1}/{args.repeats}, {where}: {shown([*SFC, *argv])}",
                  flush=True)
            t0 = time.perf_counter()
            if sfc(argv, capture=False).returncode != 0:
                raise SystemExit(f"the {where} bench failed (its message is above)")
            done[where] = {"command": shown([*SFC, *argv]),
                           "wall_s": time.perf_counter() - t0,
                           "report": BenchReport.load(out).to_dict()}
        repeats.append(done)
    return repeats


@dataclass(frozen=True)
class Failure:
    """One failure case through the CLI: its exit status, its last stderr line (the
    one-line error), all it printed to stderr (streamed remote lines included), and for a
    dropped run the remote jobs still running afterwards."""

    case: str
    command: str
    exit_status: int
    message: str
    stderr: str
    left_running: int | None = None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _left_running(marker: str, deadline_s: float = 30.0) -> int:
    """Processes holding `marker` once they are gone or the deadline passed."""
    end = time.monotonic() + deadline_s
    while (left := pids_with(marker)) and time.monotonic() < end:
        time.sleep(0.1)
    return len(left)


def run_failures(args: argparse.Namespace, work: Path) -> list[Failure]:
    """Every failure case (one run, one round) against a fresh server, which has not got
    the artifact yet."""
    artifact: Path = args.artifact
    root = work / "failures"
    root.mkdir()
    other_key, empty = root / "other_key", root / "empty_known_hosts"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(other_key))
    empty.write_text("")
    with LoopbackSshd(root) as server:
        ok = ssh_to(server)
        marker = str(server.home)  # every staged path, so every bench worker's command line
        cases: list[tuple[str, Ssh, dict[str, Any]]] = [
            ("wrong key", replace(ok, key=other_key), {}),
            ("closed port", replace(ok, port=_closed_port()), {}),
            ("unknown host key", replace(ok, known_hosts=empty), {}),
            # -S: no site-packages, so no sfc.
            ("remote Python without sfc", replace(ok, python=f"{ok.python} -S"), {}),
            ("disk too small (before the copy)", ok, {"free": 1000}),
            ("disk full during the copy", ok,
             {"write_limit": manifest(artifact).size // 2, "on_limit": "full"}),
            ("connection dropped while the worker runs", ok, {"drop_marker": marker}),
        ]
        out = []
        for case, ssh, knobs in cases:
            server.reset()
            for name, value in knobs.items():
                setattr(server.knobs, name, value)
            argv = [*bench_args(args, 1, 1), *ssh.args()]
            print(f"\n== failure: {case}: {shown([*SFC, *argv])}", flush=True)
            done = sfc(argv, capture=True)
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            left = _left_running(marker) if "drop_marker" in knobs else None
            out.append(Failure(case=case, command=shown([*SFC, *argv]),
                               exit_status=done.returncode, message=lines[-1] if lines else "",
                               stderr=done.stderr, left_running=left))
    return out


def machine() -> dict[str, Any]:
    """`sfc info --json`."""
    done = sfc(["info", "--json"], capture=True)
    if done.returncode != 0:
        raise SystemExit(f"sfc info failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def show(comparisons: Sequence[Comparison], failures: Sequence[Failure]) -> None:
    """The comparison as a table, then each failure case's exit status and message."""
    print_table(
        "remote (SSH on loopback) vs local: p50 per variant",
        ["variant", "local p50 ms", "remote p50 ms", "remote / local", "local rounds",
         "within noise"],
        [[c.variant, " ".join(f"{x:.4g}" for x in c.local_p50_ms),
          " ".join(f"{x:.4g}" for x in c.remote_p50_ms), f"{c.ratio:.3f}",
          f"{c.noise[0]:.3f}-{c.noise[1]:.3f}", "yes" if c.within_noise else "no"]
         for c in comparisons],
        caption="p50: each report's median over rounds (one value per repeat); remote / local:"
                " median over repeats; local rounds: smallest and largest local per-round p50"
                " over their median")
    print("\nfailure cases through the CLI (exit status: last stderr line):")
    for f in failures:
        left = "" if f.left_running is None else f" [remote jobs left running: {f.left_running}]"
        print(f"- {f.case} (exit {f.exit_status}): {f.message}{left}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, default=None,
                    help=f"folder or .onnx to bench (default: the {DEFAULT_MODEL} FP32 export "
                         "in $SFC_CACHE, exported on first use)")
    ap.add_argument("--baseline", default=None,
                    help="baseline folder or zoo name (default: the artifact itself when it "
                         "is a folder, else none)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1,
                    help="local/remote pairs, alternating which runs first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    if args.artifact is None:
        from sfc.models import model_folder

        args.artifact = model_folder(DEFAULT_MODEL)
    args.artifact = args.artifact.resolve()
    if args.baseline is None and args.artifact.is_dir():
        args.baseline = str(args.artifact)

    info = machine()
    with tempfile.TemporaryDirectory(prefix="sfc-remote-loopback-") as tmp:
        work = Path(tmp)
        (work / "device").mkdir()
        with LoopbackSshd(work / "device") as server:
            repeats = run_benches(args, ssh_to(server), work)
        failures = run_failures(args, work)

    comparisons = compare([BenchReport.from_dict(r["local"]["report"]) for r in repeats],
                          [BenchReport.from_dict(r["remote"]["report"]) for r in repeats])
    show(comparisons, failures)
    write_json_atomic(args.json, {
        "command": shlex.join(["python", *sys.argv]),
        "machine": info, "artifact": str(args.artifact), "baseline": args.baseline,
        "runs": args.runs, "rounds": args.rounds, "repeats": repeats,
        "comparison": [asdict(c) | {"within_noise": c.within_noise} for c in comparisons],
        "failures": [asdict(f) for f in failures],
    })
    print(f"JSON: {args.json}")
    unexpected = [f.case for f in failures if f.exit_status == 0]
    if unexpected:
        print(f"these cases did not fail: {', '.join(unexpected)}", file=sys.stderr)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
