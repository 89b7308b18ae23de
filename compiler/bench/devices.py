"""Where benchmarks run: a device starts the worker and hands back what it printed.

The worker (`python -m sfc.bench.worker --json-args ...`) prints one JSON line, so a device
only has to (1) say where a local file is as the worker sees it (`stage`), (2) run the
worker's argv (`run_worker`) and (3) describe the machine (`describe`, itself a worker run,
`describe_device`). Its `kind` ("cpu", "cuda", "jetson") tells the worker how to run and
measure there (`backends`): everything kind-specific (CUDA events, NVML, tegrastats,
nvpmodel) happens inside the worker on the device, so any way of running the worker's argv
there gets it. `LocalDevice` runs it in a local subprocess; `remote.SshDevice` over SSH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import SfcError
from .backends import KINDS
from .results import WorkerArgs, bench_payload, parse_output

__all__ = [
    "WORKER_MODULE",
    "Device",
    "LocalDevice",
    "available_devices",
    "describe_device",
    "get_device",
]

WORKER_MODULE = "sfc.bench.worker"
DEFAULT_TIMEOUT_S = 1800.0


@runtime_checkable
class Device(Protocol):
    """A machine that runs benchmark workers."""

    @property
    def name(self) -> str:
        """Short name recorded in reports ("cpu", "cuda@orin.local", ...)."""
        ...

    @property
    def kind(self) -> str:
        """What the worker runs as there: one of `backends.KINDS`."""
        ...

    def stage(self, path: Path) -> str:
        """`path` as the worker on this device sees it (a remote device copies it there)."""
        ...

    def run_worker(self, argv: Sequence[str], *,
                   timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run the worker with `argv` and return its exit status, stdout and stderr."""
        ...

    def describe(self) -> dict[str, Any]:
        """The machine as the worker sees it (`describe_device`): CPU, ORT, providers,
        timing; GPU (NVML) and Jetson board, release and power mode where they apply."""
        ...


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


@dataclass(frozen=True)
class LocalDevice:
    """This machine, as a device of `kind`: each worker is a fresh local Python process."""

    kind: str = "cpu"
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SfcError(f"unknown device {self.kind!r}; choose from {', '.join(KINDS)}")

    @property
    def name(self) -> str:
        """Registry name: the kind."""
        return self.kind

    def stage(self, path: Path) -> str:
        """Local paths need no copying; absolute so the worker's cwd does not matter."""
        return str(Path(path).resolve())

    def command(self, argv: Sequence[str]) -> list[str]:
        """The full command line of a worker run."""
        return [self.python, "-m", WORKER_MODULE, *argv]

    def run_worker(self, argv: Sequence[str], *,
                   timeout_s: float | None = DEFAULT_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run the worker locally; a hang past `timeout_s` is a one-line SfcError."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            return subprocess.run(self.command(argv), capture_output=True, text=True,
                                  timeout=timeout_s, env=env, check=False)
        except subprocess.TimeoutExpired:
            raise SfcError(f"benchmark worker timed out after {timeout_s:.0f} s") from None
        except OSError as exc:
            raise SfcError(f"cannot start the benchmark worker with {self.python}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """Ask a worker (the same code a remote device runs) to describe this machine."""
        return describe_device(self)


def call_worker(device: Device, args: WorkerArgs, *, expect: str,
                timeout_s: float | None = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Run one worker on `device` and return the payload of its `expect` envelope.

    A `WorkerError` (bad input found by the worker) and a crash (no result line, e.g. ORT
    aborting) both become a one-line SfcError naming the cause.
    """
    done = device.run_worker(args.argv(), timeout_s=timeout_s)
    try:
        obj = parse_output(done.stdout)
    except SfcError:
        raise SfcError(f"benchmark worker on {device.name} exited {done.returncode}: "
                       f"{_last_line(done.stderr)}") from None
    if obj.get("_type") == "WorkerError":
        raise SfcError(str(bench_payload(obj, "WorkerError").get("message", "worker failed")))
    return bench_payload(obj, expect)


def describe_device(device: Device, *,
                    timeout_s: float | None = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """A describe worker of `device.kind` run on `device`; a device that lacks what its kind
    needs (no GPU, no tegrastats) fails here with the worker's one-line reason."""
    return call_worker(device, WorkerArgs(mode="describe", device=device.kind),
                       expect="DeviceInfo", timeout_s=timeout_s)


def available_devices() -> tuple[str, ...]:
    """Every device name."""
    return KINDS


def get_device(name: str, *, host: str | None = None, **ssh: Any) -> Device:
    """This machine as the device `name` ("cpu", "cuda" or "jetson"), or with `host`
    ("user@host") that machine over SSH (`remote.SshDevice`, its options in `ssh`).

    Whether the machine has what the kind needs is found by its first worker (`describe`).
    """
    base = name.strip().lower()
    if base not in KINDS:
        raise SfcError(f"unknown device {name!r}; choose from {', '.join(available_devices())}")
    if host is not None:
        # Imported here: a worker on the device imports this package and needs no asyncssh.
        from .remote import SshDevice

        return SshDevice(host, kind=base, **ssh)
    return LocalDevice(base)
