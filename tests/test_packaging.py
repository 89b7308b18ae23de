"""The installed package must carry every subpackage: pyproject lists them by hand (the
`sfc` -> compiler/ mapping), and an editable install hides a missing entry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = set()
    for name, folder in config["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            on_disk.add(".".join((name, *rel)))
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    data_only = set(config.get("package-data", {}))  # data folders, no modules
    assert listed - on_disk - data_only == set(), "these listed packages do not exist"


def test_the_repository_kernels_folder_does_not_shadow_the_installed_kernels_package() -> None:
    """From the repository root (on sys.path, as `python -m` and pytest put it), `kernels`
    is still the installed Hugging Face package that transformers imports."""
    import importlib.metadata

    repo = REPO
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed: nothing to shadow")
    code = ("import sfc, kernels\nfrom transformers.models.whisper import modeling_whisper\n"
            "print(kernels.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert not Path(done.stdout.strip()).is_relative_to(repo)
