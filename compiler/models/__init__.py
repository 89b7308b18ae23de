"""Sources: zoo checkpoints (exported with torch) and plain ONNX files."""

from __future__ import annotations

from pathlib import Path

from ..card import CARD_NAME, ModelCard
from ..errors import SfcError
from ..paths import cache_dir
from .zoo import ZOO

__all__ = ["ZOO", "export_source", "model_folder"]


def export_source(src: str, out_dir: Path) -> ModelCard:
    """Export a zoo model or an `.onnx` file into `out_dir` and return its card."""
    if src in ZOO:
        from .whisper_export import export_whisper  # imports torch: only when exporting

        return export_whisper(src, out_dir)
    path = Path(src)
    if path.suffix == ".onnx" or path.exists():
        from .onnx_source import export_onnx_file

        return export_onnx_file(path, out_dir)
    raise SfcError(f"unknown source {src!r}: give a zoo name ({', '.join(sorted(ZOO))}) "
                   "or a path to an .onnx file")


def model_folder(model: str) -> Path:
    """An export/build folder for `model`: the folder itself, or a zoo name's cached export
    (made on first use)."""
    path = Path(model)
    if path.is_dir():
        return path
    if model in ZOO:
        folder = cache_dir() / "exports" / model
        if not (folder / CARD_NAME).is_file():
            export_source(model, folder)
        return folder
    raise SfcError(f"{model} is neither an sfc export/build folder nor a zoo model "
                   f"({', '.join(sorted(ZOO))})")
