"""Where a build's and an evaluation's independent tasks run: in this process, or on Ray
workers.

An executor takes a list of tasks (ESC: the candidates of one CMA-ES generation, scale
dicts; the two-stage probes: gate feeds; an evaluation: utterances) and yields their
results in input order, whatever order they finish in, so a search run through any
executor tells CMA-ES the same values in the same order, and with the same seed ends with
the same scales, byte for byte.

- `InProcess` calls one function, one task after the other (the default).
- `RayExecutor` spreads them over Ray actors (`--ray-address auto|HOST:PORT`, or a local
  Ray started with `--workers N`). Each actor builds one function (an objective, a
  transcriber) from a picklable factory shipped once through the object store, with (the
  cluster's CPUs / workers) ONNX Runtime threads; a task goes to whichever actor is free.
  An actor that dies is replaced and its task retried, up to `retries` times per task.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from .errors import SfcError, first_line

__all__ = ["CONNECT_TIMEOUT", "Executor", "InProcess", "ObjectiveFactory", "RayExecutor",
           "check_ray_options"]

CONNECT_TIMEOUT = 3.0  # seconds for a Ray head to accept a connection (ray.init has none)

class Executor(Protocol):
    """Runs tasks; `evaluate` yields one result per task, in input order."""

    def evaluate(self, tasks: Sequence[Any]) -> Iterator[Any]: ...

    def close(self) -> None: ...


class ObjectiveFactory(Protocol):
    """What a Ray worker builds its function from (`calib.objectives.ObjectiveSpec`,
    `eval.shards.TranscriberSpec`)."""

    def make(self, threads: int | None = None) -> Any: ...


class InProcess:
    """Calls `function` here, lazily: a Ctrl-C mid-generation keeps the values so far."""

    def __init__(self, function: Callable[[Any], Any]) -> None:
        self.function = function

    def evaluate(self, tasks: Sequence[Any]) -> Iterator[Any]:
        return (self.function(t) for t in tasks)

    def close(self) -> None:
        """Nothing to release: the objective belongs to the caller."""


class _Worker:
    """One Ray actor's function, built once."""

    def __init__(self, factory: ObjectiveFactory, threads: int) -> None:
        self.function = factory.make(threads=threads)

    def evaluate(self, task: Any) -> Any:
        return self.function(task)

    def peak_rss(self) -> int:
        """This worker process's peak resident memory in bytes (Linux: ru_maxrss is KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SfcError(f"--ray-address must be auto or HOST:PORT, not {address!r}")
    return host, int(port)


def check_ray_options(workers: int | None, address: str | None) -> None:
    """A one-line SfcError for Ray options that cannot work (checked before a build's
    minutes of calibration): Ray missing, no worker count for a local Ray, a bad count or
    address."""
    if importlib.util.find_spec("ray") is None:
        raise SfcError("--ray-address and --workers need Ray: pip install 'sfc[ray]'")
    if address is None and workers is None:
        raise SfcError("a local Ray executor needs --workers N")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise SfcError(f"--workers must be an integer >= 1, got {workers!r}")
    if address is not None and address != "auto":
        _probe(address)  # at once, not after the statistics pass


def _probe(address: str) -> None:
    """A one-line SfcError unless HOST:PORT accepts a TCP connection within
    CONNECT_TIMEOUT: ray.init waits minutes on an address that does not answer."""
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise SfcError(f"no Ray cluster answers at {address}: {first_line(exc)}") from None


def _connect(address: str | None, workers: int | None) -> tuple[int, bool]:
    """Connect to (or start) Ray; (the cluster's CPUs, whether this call started Ray). A Ray
    this process already runs is reused as it is."""
    import ray

    if address is not None and address != "auto":
        _probe(address)
    if ray.is_initialized():
        return int(ray.cluster_resources().get("CPU", 1)), False
    try:
        if address is None:
            # A new Ray ("local": not one `ray start` left running), as many CPUs as cores.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers or 1),
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:  # "auto" with no cluster running
        raise SfcError(f"no Ray cluster at {address}: {first_line(exc)}") from None
    return int(ray.cluster_resources().get("CPU", 1)), True


class RayExecutor:
    """Runs tasks on `workers` Ray actors, each holding one function built from `factory`
    (shipped once through `ray.put`).

    `address`: "auto" or HOST:PORT of a running cluster; None starts a local Ray (`workers`
    then required). `workers` on a cluster defaults to one per live node. Each worker gets
    cluster CPUs / workers ONNX Runtime threads (at least one). A task whose worker died
    is retried on a fresh worker, at most `retries` times.
    """

    def __init__(self, factory: ObjectiveFactory, *, address: str | None = None,
                 workers: int | None = None, retries: int = 3) -> None:
        check_ray_options(workers, address)
        import ray

        cpus, self._started = _connect(address, workers)
        self.workers = workers or max(1, sum(n["Alive"] for n in ray.nodes()))
        self.threads = max(1, cpus // self.workers)
        self.retries = retries
        # Each worker reserves its share of the CPUs, so Ray spreads them over the nodes.
        self._cls = ray.remote(_Worker).options(num_cpus=cpus / self.workers)
        self._factory = ray.put(factory)
        self._actors = [self._spawn() for _ in range(self.workers)]
        try:
            # Wait for every objective now: a worker that cannot build one fails here, once.
            self.peak_rss()
        except SfcError:
            self.close()
            raise

    def _spawn(self) -> Any:
        return self._cls.remote(self._factory, self.threads)

    @staticmethod
    def _get(refs: Any) -> Any:
        """ray.get, with an error raised in a worker as a one-line SfcError."""
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            raise SfcError(f"a Ray worker failed: {first_line(exc.cause)}") from None
        except ray.exceptions.RayActorError as exc:
            raise SfcError(f"a Ray worker could not start: {first_line(exc)}") from None

    def evaluate(self, tasks: Sequence[Any]) -> Iterator[Any]:
        import ray

        pending = deque(range(len(tasks)))
        idle = deque(range(len(self._actors)))
        running: dict[Any, tuple[int, int]] = {}  # ray task -> (task index, worker slot)
        deaths = [0] * len(tasks)
        done: dict[int, Any] = {}
        given = 0
        while given < len(tasks):
            while pending and idle:
                i, slot = pending.popleft(), idle.popleft()
                running[self._actors[slot].evaluate.remote(tasks[i])] = (i, slot)
            ready, _ = ray.wait(list(running), num_returns=1)
            i, slot = running.pop(ready[0])
            try:
                done[i] = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                deaths[i] += 1
                if deaths[i] > self.retries:
                    raise SfcError(f"Ray workers died {deaths[i]} times running one task: "
                                   f"{first_line(exc)}") from None
                self._actors[slot] = self._spawn()
                pending.appendleft(i)
            except ray.exceptions.RayTaskError as exc:
                raise SfcError(f"a Ray worker failed: {first_line(exc.cause)}") from None
            idle.append(slot)
            while given in done:
                yield done.pop(given)
                given += 1

    def peak_rss(self) -> list[int]:
        """Each worker's peak resident memory in bytes."""
        return list(self._get([a.peak_rss.remote() for a in self._actors]))

    def close(self) -> None:
        """Stop the workers, and Ray itself when this executor started it."""
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started:
            ray.shutdown()
