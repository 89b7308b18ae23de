"""CTranslate2 Whisper weights -> transformers' `WhisperForConditionalGeneration`, loaded strictly.

The name map follows ctranslate2's WhisperSpec (see the table in the project guide);
fused CT2 projections ([q;k;v] for self-attention, [k;v] for cross-attention) are split.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SfcError
from .ct2_reader import Ct2Model, read_ct2_model
from .zoo import CheckpointFiles

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration

__all__ = ["LoadedWhisper", "ct2_to_hf_state_dict", "load_whisper", "whisper_settings"]


@dataclass(frozen=True)
class LoadedWhisper:
    """A converted checkpoint and what decoding needs from its package."""

    model: WhisperForConditionalGeneration
    checkpoint: CheckpointFiles
    ct2_config: dict[str, Any]


def _count_layers(names: list[str], prefix: str) -> int:
    # `layer_norm` also starts with `layer_`, so match `layer_<digits>/` only.
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    return len(found)


def _linear(sd: dict[str, np.ndarray], hf: str, v: dict[str, np.ndarray], ct2: str) -> None:
    sd[f"{hf}.weight"] = v[f"{ct2}/weight"]
    sd[f"{hf}.bias"] = v[f"{ct2}/bias"]


def _norm(sd: dict[str, np.ndarray], hf: str, v: dict[str, np.ndarray], ct2: str) -> None:
    sd[f"{hf}.weight"] = v[f"{ct2}/gamma"]
    sd[f"{hf}.bias"] = v[f"{ct2}/beta"]


def _split_rows(
    sd: dict[str, np.ndarray], hf_names: list[str], v: dict[str, np.ndarray], ct2: str,
    biasless: str | None,
) -> None:
    """Split a fused CT2 projection into HF's q/k/v projections (k has no bias in HF)."""
    weights = np.split(v[f"{ct2}/weight"], len(hf_names))
    biases = np.split(v[f"{ct2}/bias"], len(hf_names))
    for name, w, b in zip(hf_names, weights, biases, strict=True):
        sd[f"{name}.weight"] = w
        if name == biasless:
            if np.any(b != 0):
                raise SfcError(f"CT2 variable {ct2}/bias has a non-zero k bias; HF has none")
        else:
            sd[f"{name}.bias"] = b


def ct2_to_hf_state_dict(ct2: Ct2Model) -> dict[str, np.ndarray]:
    """Map CT2 WhisperSpec variables onto HF state-dict names (float32)."""
    v = ct2.variables
    sd: dict[str, np.ndarray] = {}
    names = list(v)
    for side in ("encoder", "decoder"):
        hf_side = f"model.{side}"
        _norm(sd, f"{hf_side}.layer_norm", v, f"{side}/layer_norm")
        sd[f"{hf_side}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"]
        for i in range(_count_layers(names, side)):
            c, h = f"{side}/layer_{i}", f"{hf_side}.layers.{i}"
            _split_rows(sd, [f"{h}.self_attn.{p}_proj" for p in "qkv"], v,
                        f"{c}/self_attention/linear_0", biasless=f"{h}.self_attn.k_proj")
            _linear(sd, f"{h}.self_attn.out_proj", v, f"{c}/self_attention/linear_1")
            _norm(sd, f"{h}.self_attn_layer_norm", v, f"{c}/self_attention/layer_norm")
            _linear(sd, f"{h}.fc1", v, f"{c}/ffn/linear_0")
            _linear(sd, f"{h}.fc2", v, f"{c}/ffn/linear_1")
            _norm(sd, f"{h}.final_layer_norm", v, f"{c}/ffn/layer_norm")
            if side == "decoder":
                _linear(sd, f"{h}.encoder_attn.q_proj", v, f"{c}/attention/linear_0")
                _split_rows(sd, [f"{h}.encoder_attn.{p}_proj" for p in "kv"], v,
                            f"{c}/attention/linear_1", biasless=f"{h}.encoder_attn.k_proj")
                _linear(sd, f"{h}.encoder_attn.out_proj", v, f"{c}/attention/linear_2")
                _norm(sd, f"{h}.encoder_attn_layer_norm", v, f"{c}/attention/layer_norm")
    for i in (1, 2):
        _linear(sd, f"model.encoder.conv{i}", v, f"encoder/conv{i}")
    sd["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    sd["proj_out.weight"] = v["decoder/projection/weight"]
    return {k: np.asarray(a, dtype=np.float32) for k, a in sd.items()}


def load_whisper(checkpoint: CheckpointFiles) -> LoadedWhisper:
    """Build `WhisperForConditionalGeneration` from a CT2 checkpoint; strict load (0 missing,
    0 unexpected keys) or an error."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    ct2 = read_ct2_model(checkpoint.model_bin)
    if ct2.spec_name != "WhisperSpec":
        raise SfcError(f"{checkpoint.model_bin[0]}: spec {ct2.spec_name!r} is not WhisperSpec")
    ct2_config = json.loads(Path(checkpoint.config_json).read_text())
    sd = ct2_to_hf_state_dict(ct2)
    model = WhisperForConditionalGeneration(WhisperConfig(**whisper_settings(ct2)))
    result = model.load_state_dict({k: torch.from_numpy(a) for k, a in sd.items()}, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises; kept as a guard
        raise SfcError(f"checkpoint does not match: {result}")
    model.eval()
    return LoadedWhisper(model=model, checkpoint=checkpoint, ct2_config=ct2_config)


def whisper_settings(ct2: Ct2Model) -> dict[str, Any]:
    """The `WhisperConfig` fields of a CT2 Whisper checkpoint, read off its tensors."""
    v = ct2.variables
    names = list(v)
    d_model = int(v["encoder/conv1/weight"].shape[0])
    return dict(
        vocab_size=int(v["decoder/embeddings/weight"].shape[0]),
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        d_model=d_model,
        encoder_layers=_count_layers(names, "encoder"),
        decoder_layers=_count_layers(names, "decoder"),
        encoder_attention_heads=ct2.scalar("encoder/num_heads"),
        decoder_attention_heads=ct2.scalar("decoder/num_heads"),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        tie_word_embeddings=True,
        # Eager attention keeps QK^T and AV as plain MatMuls in the exported graph.
        attn_implementation="eager",
    )
