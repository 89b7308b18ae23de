"""Copy tensorrt-stubs into .typings/ with its syntax errors fixed, for mypy.

Why: tensorrt-stubs 10.13 installs `tensorrt/__init__.pyi` without a py.typed marker (mypy
then treats `tensorrt` as untyped: everything is Any), and its `tensorrt_bindings` stub
does not parse (parameters named with the keyword `in`; a required parameter after
defaulted ones in `add_scale_nd`). mypy reads `.typings/` first (`mypy_path` in
pyproject.toml), so the TensorRT modules are checked against the real signatures.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / ".typings"


def main() -> int:
    try:
        files = importlib.metadata.distribution("tensorrt-stubs").files or []
    except importlib.metadata.PackageNotFoundError:
        print("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs",
              file=sys.stderr)
        return 1
    for f in files:
        if f.suffix != ".pyi":
            continue
        text = Path(str(f.locate())).read_text(encoding="utf-8")
        text = re.sub(r"([(,]\s*)in:", r"\1in_:", text)
        text = text.replace("channel_axis: int)", "channel_axis: int = ...)")
        dest = OUT / str(f)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
    print(f"TensorRT stubs for mypy in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
