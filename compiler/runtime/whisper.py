"""The edge Whisper runtime: audio -> log-mel -> encoder -> greedy KV-cached decoder -> text.

Runs an sfc export or build folder with ONNX Runtime, numpy and `tokenizers` only.
Audio longer than one window (30 s) is cut into consecutive windows that are decoded
independently and joined with a space; windows follow OpenAI's convention (see
`features.whisper_windows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..card import GraphSpec, ModelCard, WhisperDecoding
from ..errors import SfcError
from .decoding import LOOP_GUARD, DecoderStep, LoopGuard, greedy_decode
from .features import LogMelSpec, whisper_windows
from .session import open_session


def _open(folder: Path, graph: GraphSpec, threads: int | None) -> Any:
    """An ORT session, or a TensorRT engine runner for a `.plan` (same `run` interface)."""
    if graph.path.endswith(".plan"):
        from .trt_session import open_engine

        return open_engine(folder / graph.path)
    return open_session(folder / graph.path, threads=threads, optimization=graph.optimization)

__all__ = ["Transcript", "WhisperRuntime"]


@dataclass(frozen=True)
class Transcript:
    """The text of one recording and how many of its windows the loop guard ended."""

    text: str
    loop_stops: int = 0


@dataclass
class WhisperRuntime:
    """Loaded sessions and tokenizer for one Whisper folder."""

    card: ModelCard
    decoding: WhisperDecoding
    mel: LogMelSpec
    encoder: Any  # ort.InferenceSession or TrtSession
    decoder: Any
    tokenizer: Tokenizer
    max_batch: int = 8
    guard: LoopGuard | None = LOOP_GUARD

    @classmethod
    def open(cls, folder: str | Path, *, threads: int | None = None,
             guard: LoopGuard | None = LOOP_GUARD) -> WhisperRuntime:
        """Open an export or build folder (its `card.json` says which file is which)."""
        folder = Path(folder)
        card = ModelCard.load(folder)
        if card.family != "whisper" or card.decoding is None or card.tokenizer is None:
            raise SfcError(f"{folder} holds a {card.family!r} model; transcription needs Whisper")
        for key in ("encoder", "decoder"):
            if key not in card.graphs:
                raise SfcError(f"{folder}/card.json names no {key} graph")
        tok_path = folder / card.tokenizer
        if not tok_path.is_file():
            raise SfcError(f"tokenizer file not found: {tok_path}")
        return cls(
            card=card,
            decoding=card.decoding,
            mel=LogMelSpec.from_dict(card.preprocessing or {}),
            encoder=_open(folder, card.graphs["encoder"], threads),
            decoder=_open(folder, card.graphs["decoder"], threads),
            tokenizer=Tokenizer.from_file(str(tok_path)),
            guard=guard,
        )

    def encode(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the encoder on [B, n_mels, frames]; return the cross-attention K and V."""
        _, cross_k, cross_v = self.encoder.run(None, {"input_features": features})
        return cross_k, cross_v

    def step_fn(self, cross_k: np.ndarray, cross_v: np.ndarray) -> DecoderStep:
        """A decoder step with this utterance's cross-attention K/V bound."""

        def step(tokens: np.ndarray, past_k: np.ndarray,
                 past_v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            logits, k, v = self.decoder.run(None, {
                "tokens": tokens, "past_key": past_k, "past_value": past_v,
                "cross_key": cross_k, "cross_value": cross_v})
            return logits, k, v

        return step

    def decode_windows(self, windows: np.ndarray) -> list[Transcript]:
        """Transcribe encoder inputs [W, n_mels, frames], batched up to `max_batch`."""
        out: list[Transcript] = []
        for start in range(0, len(windows), self.max_batch):
            batch = windows[start : start + self.max_batch]
            cross_k, cross_v = self.encode(batch)
            dec = greedy_decode(self.step_fn(cross_k, cross_v), self.decoding, len(batch),
                                guard=self.guard)
            for seq, looped in zip(dec.ids, dec.looped, strict=True):
                text = self.tokenizer.decode(seq, skip_special_tokens=True).strip()
                out.append(Transcript(text, int(looped)))
        return out

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Text of 16 kHz mono float32 audio of any length."""
        windows = self.decode_windows(whisper_windows(audio, self.mel))
        return Transcript(" ".join(w.text for w in windows if w.text),
                          sum(w.loop_stops for w in windows))
