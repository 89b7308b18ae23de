"""Sources: zoo checkpoints (exported with torch) and plain ONNX files."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..atomic import atomic_path, file_lock
from ..card import CARD_NAME, ModelCard
from ..errors import SfcError
from ..memory import peak_rss_kib
from ..paths import cache_dir
from .zoo import EXPORT_FORMAT, ZOO

__all__ = ["EXPORT_FACTS", "ZOO", "export_peak_mib", "export_source", "model_folder",
           "zoo_export_cached"]

EXPORT_FACTS = "export.json"  # how a cached zoo export was made (its process's peak memory)


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


def _export_child(src: str, out: str) -> float:
    """The child process's job: export, then report its own peak resident memory (MiB)."""
    export_source(src, Path(out))
    return peak_rss_kib() / 1024


def _export_in_child(src: str, out: Path) -> None:
    """Export a zoo model in a fresh process, so that torch's memory (about 1.1 GB for
    whisper-tiny.en) is given back before the caller builds or transcribes, and record
    that process's peak in `out/export.json`."""
    context = multiprocessing.get_context("spawn")  # no fork of a parent holding sessions
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        peak = pool.submit(_export_child, src, str(out)).result()
    with atomic_path(out / EXPORT_FACTS) as tmp:
        tmp.write_text(json.dumps({"peak_rss_mib": round(peak, 1)}) + "\n")


def _zoo_folder(model: str) -> Path:
    return cache_dir() / "exports" / model


def zoo_export_cached(model: str) -> bool:
    """Whether zoo model `model` is already exported in the cache, in this sfc's export
    format (False for other names)."""
    if model not in ZOO or not (_zoo_folder(model) / CARD_NAME).is_file():
        return False
    try:
        return ModelCard.load(_zoo_folder(model)).source.get("format") == EXPORT_FORMAT
    except SfcError:  # a damaged card: export again
        return False


def export_peak_mib(folder: Path) -> float | None:
    """The peak resident memory of the process that exported `folder` (None: unrecorded)."""
    try:
        return float(json.loads((Path(folder) / EXPORT_FACTS).read_text())["peak_rss_mib"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def model_folder(model: str) -> Path:
    """An export/build folder for `model`: the folder itself, or a zoo name's cached export
    (made on first use, in a separate process)."""
    path = Path(model)
    if path.is_dir():
        return path
    if model in ZOO:
        folder = _zoo_folder(model)
        if not zoo_export_cached(model):
            # Builds at once share the cache: one exports, the others wait and reuse it (the
            # export is published in one step, so no reader sees half of one).
            with file_lock(folder.parent / f".{model}.lock",
                           f"waiting for another sfc process exporting {model}"):
                if not zoo_export_cached(model):
                    _export_in_child(model, folder)
        return folder
    raise SfcError(f"{model} is neither an sfc export/build folder nor a zoo model "
                   f"({', '.join(sorted(ZOO))})")
