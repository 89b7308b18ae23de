"""Where benchmarks run: a device starts the worker and hands back what it printed.

The worker (`python -m sfc.bench.worker --json-args ...`) prints one JSON line, so a device
only has to (1) say where a local file is as the worker sees it (`stage`), (2) run the
worker's argv (`run_worker`) and (3) describe the machine (`describe`, itself a worker run).
`CpuDevice` runs it in a local subprocess; a Jetson device will run the same argv over SSH
(`ssh host python3 -m sfc.bench.worker ...`, files staged with rsync) and add tegrastats.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import SfcError
from .results import WorkerArgs, bench_payload, parse_output

__all__ = [
    "WORKER_MODULE",
    "CpuDevice",
    "Device",
    "available_devices",
    "get_device",
]

WORKER_MODULE = "sfc.bench.worker"
DEFAULT_TIMEOUT_S = 1800.0

# Registered so that asking for them says what is coming instead of "unknown device".
_PLANNED: dict[str, str] = {
    "cuda": "ONNX Runtime CUDA / TensorRT execution on a local GPU, nvidia-smi memory",
    "jetson": "local or over SSH, tegrastats",
}


@runtime_checkable
class Device(Protocol):
    """A machine that runs benchmark workers."""

    @property
    def name(self) -> str:
        """Short name recorded in reports ("cpu", "jetson", ...)."""
        ...

    def stage(self, path: Path) -> str:
        """`path` as the worker on this device sees it (a remote device copies it there)."""
        ...

    def run_worker(self, argv: Sequence[str], *,
                   timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run the worker with `argv` and return its exit status, stdout and stderr."""
        ...

    def describe(self) -> dict[str, Any]:
        """CPU model, cores, flags, ORT version and providers of this device."""
        ...


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


@dataclass(frozen=True)
class CpuDevice:
    """This machine's CPU: each worker is a fresh local Python process."""

    python: str = sys.executable

    @property
    def name(self) -> str:
        """Registry name."""
        return "cpu"

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
        return call_worker(self, WorkerArgs(mode="describe"), expect="DeviceInfo")


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


def available_devices() -> tuple[str, ...]:
    """Every device name, implemented or planned."""
    return tuple(sorted({*_DEVICES, *_PLANNED}))


_DEVICES: dict[str, Callable[[], Device]] = {"cpu": CpuDevice}


def get_device(name: str) -> Device:
    """The device registered as `name`; planned devices and unknown names raise SfcError.

    A suffix after ':' (a future `jetson:user@host`) is ignored for the lookup.
    """
    base = name.split(":", 1)[0].strip().lower()
    if base in _DEVICES:
        return _DEVICES[base]()
    if base in _PLANNED:
        raise SfcError(f"device {base!r} is not implemented yet (planned: {_PLANNED[base]})")
    raise SfcError(f"unknown device {name!r}; choose from {', '.join(available_devices())}")
