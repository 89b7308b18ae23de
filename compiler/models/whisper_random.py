"""Shape-true Whisper models with seeded random weights, for speed and memory only.

No larger Whisper checkpoint installs here (issue 16: the whisper-small packages on PyPI
hold a truncated model.bin), so scaling is measured on models with the published
architectures of whisper-small and whisper-medium (transformers' `WhisperConfig` fields as
in OpenAI's release; only whisper-small has been exported here so far) and weights drawn
by transformers' own initialiser under a seed. They
borrow whisper-base's tokenizer and decoding settings (the same multilingual vocabulary of
51865 tokens). Their transcripts are noise: every number from them is labelled "random
weights, speed and memory only", and no WER is ever reported for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..card import ModelCard
from ..errors import SfcError
from .ct2_reader import read_ct2_model
from .whisper_hf import LoadedWhisper, whisper_settings
from .zoo import locate_checkpoint

__all__ = ["SHAPES", "WhisperShape", "export_random_whisper", "random_whisper"]


@dataclass(frozen=True)
class WhisperShape:
    """A Whisper architecture: width, layers, heads and feed-forward size."""

    d_model: int
    layers: int  # encoder and decoder each
    heads: int
    ffn: int


SHAPES = {
    "whisper-small": WhisperShape(d_model=768, layers=12, heads=12, ffn=3072),
    "whisper-medium": WhisperShape(d_model=1024, layers=24, heads=16, ffn=4096),
}
BORROWED = "whisper-base"  # tokenizer, vocabulary and decoding settings


def random_whisper(shape: str, seed: int) -> LoadedWhisper:
    """`shape` (a key of SHAPES) with transformers' initial weights drawn under `seed`."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    if shape not in SHAPES:
        raise SfcError(f"unknown shape {shape!r}; choose from {', '.join(sorted(SHAPES))}")
    s = SHAPES[shape]
    checkpoint = locate_checkpoint(BORROWED)
    settings = whisper_settings(read_ct2_model(checkpoint.model_bin)) | dict(
        d_model=s.d_model, encoder_layers=s.layers, decoder_layers=s.layers,
        encoder_attention_heads=s.heads, decoder_attention_heads=s.heads,
        encoder_ffn_dim=s.ffn, decoder_ffn_dim=s.ffn)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**settings))
    model.eval()
    return LoadedWhisper(model=model, checkpoint=checkpoint,
                         ct2_config=json.loads(Path(checkpoint.config_json).read_text()))


def export_random_whisper(shape: str, seed: int, out_dir: Path) -> ModelCard:
    """Export `random_whisper(shape, seed)` to `out_dir` as model
    "<shape>-random-s<seed>"; the card's source says the weights are random."""
    from .whisper_export import export_loaded

    loaded = random_whisper(shape, seed)
    name = f"{shape}-random-s{seed}"
    source = {"random_weights": "speed and memory only", "shape": shape, "seed": str(seed),
              "tokenizer_from": BORROWED, **loaded.checkpoint.versions}
    return export_loaded(loaded, name, out_dir, source)
