"""The top-level import name `kernels` belongs to the installed Hugging Face package of that
name (transformers >= 5 imports it). This repository's `kernels/` folder is `sfc.kernels`;
but where the repository root is on `sys.path` (`python -m sfc.cli` run from it, pytest), the
folder would be found first as `kernels` and transformers' import of Whisper would fail
("cannot import name 'CUDAProperties' from 'kernels'"). A finder placed first on
`sys.meta_path` resolves the name to the installed distribution, and to nothing else."""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from typing import Any

__all__ = ["install"]


class _InstalledKernels:
    """Resolves `kernels` to the files of the installed `kernels` distribution, if any."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None
                  ) -> ModuleSpec | None:
        if fullname != "kernels":
            return None
        import importlib.metadata
        import importlib.util
        from pathlib import Path

        try:
            dist = importlib.metadata.distribution("kernels")
        except importlib.metadata.PackageNotFoundError:
            return None
        init = Path(str(dist.locate_file("kernels/__init__.py")))
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            "kernels", init, submodule_search_locations=[str(init.parent)])


def install() -> None:
    """Put the finder first on `sys.meta_path` (once)."""
    if not any(isinstance(f, _InstalledKernels) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstalledKernels())
