"""The installed package must carry every subpackage: pyproject lists them by hand (the
`sfc` -> compiler/ mapping), and an editable install hides a missing entry."""

from __future__ import annotations

from pathlib import Path

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
