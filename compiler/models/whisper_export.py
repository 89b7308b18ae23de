"""Export Whisper to FP32 ONNX: an encoder that also emits the cross-attention K/V once
per utterance, and a decoder step with a growing self-attention KV cache.

Graphs (L decoder layers, H heads, D head dim, F mel frames, S = F / 2 encoder positions):
- encoder.onnx: input_features [B, n_mels, F] -> last_hidden_state [B, S, d_model],
  cross_key / cross_value [L, B, H, S, D]. F is 3000 (a 30 s window) unless the runtime is
  asked for a shorter window (`WhisperRuntime.window`, `--encoder-window`; whisper.cpp's
  `audio_ctx`):
  the positional table's first S rows are added, as the first S positions of a 30 s
  window get them, so at 3000 frames the graph computes what transformers' encoder does.
- decoder.onnx: tokens [B, T] int64, past_key / past_value [L, B, H, P, D] (P may be 0),
  cross_key_0 .. cross_key_{L-1} / cross_value_0 .. [B, H, S, D] -> logits [B, T, vocab],
  present_key / present_value [L, B, H, P+T, D]. The position offset is P, read from the
  cache's shape. The cross K/V go in per layer because a stacked input is split into
  per-layer copies at every step (13-17% of a step on CPU; BENCHMARKS.md, issue 13); the
  runtime feeds views of the encoder's stacked outputs (`sfc.runtime.cross.cross_feed`).
The decoder step is written here, on the HF module's weights, because an explicit step
function exports to a clean graph (plain MatMul attention, no cache classes).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from ..atomic import staging_dir
from ..card import (
    ModelCard,
    WhisperDecoding,
    graph_spec_from_onnx,
    language_tokens,
    special_tokens,
)
from ..errors import SfcError
from ..runtime.cross import cross_input_names
from ..runtime.features import LogMelSpec
from .whisper_hf import LoadedWhisper, load_whisper
from .zoo import EXPORT_FORMAT, locate_checkpoint

if TYPE_CHECKING:
    import torch

__all__ = ["OPSET", "export_loaded", "export_whisper", "whisper_decoding"]

OPSET = 17
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
TOKENIZER_FILE = "tokenizer.json"


def whisper_decoding(loaded: LoadedWhisper) -> WhisperDecoding:
    """Decoding tokens from the checkpoint's own tokenizer.json and config.json."""
    cfg = loaded.model.config
    ids = special_tokens(loaded.checkpoint.tokenizer_json)
    languages, tasks = language_tokens(ids, cfg.vocab_size)
    names = ["<|startoftranscript|>"]
    if languages:  # the default prompt: English transcription
        names += ["<|en|>", "<|transcribe|>"]
    names.append("<|notimestamps|>")
    missing = [n for n in [*names, "<|endoftext|>"] if n not in ids]
    if missing:
        raise SfcError(f"{loaded.checkpoint.tokenizer_json} lacks special tokens {missing}")
    return WhisperDecoding(
        prompt=tuple(ids[n] for n in names),
        eot=ids["<|endoftext|>"],
        timestamp_begin=ids["<|notimestamps|>"] + 1,
        suppress=tuple(int(i) for i in loaded.ct2_config.get("suppress_ids", [])),
        suppress_begin=tuple(int(i) for i in loaded.ct2_config.get("suppress_ids_begin", [])),
        max_target_positions=cfg.max_target_positions,
        n_layers=cfg.decoder_layers,
        n_heads=cfg.decoder_attention_heads,
        head_dim=cfg.d_model // cfg.decoder_attention_heads,
        vocab_size=cfg.vocab_size,
        languages=languages,
        tasks=tasks,
    )


def _modules(loaded: LoadedWhisper) -> tuple[torch.nn.Module, torch.nn.Module]:
    import torch
    from torch import nn

    hf = loaded.model.model
    n_heads = loaded.model.config.decoder_attention_heads

    def heads(x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.reshape(b, t, n_heads, d // n_heads).transpose(1, 2)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        w = torch.matmul(q * scale, k.transpose(-1, -2))
        if mask is not None:
            w = w + mask
        out = torch.matmul(torch.softmax(w, dim=-1), v)
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)

    class AnyFrames(nn.Module):
        """transformers' WhisperEncoder.forward (inference), less its 3000-frame check, on
        the same submodules under the same names (so graph and weight names stay those of
        earlier exports)."""

        def __init__(self, enc: Any) -> None:
            super().__init__()
            self.conv1, self.conv2 = enc.conv1, enc.conv2
            self.embed_positions, self.layers, self.layer_norm = (
                enc.embed_positions, enc.layers, enc.layer_norm)

        def forward(self, input_features: torch.Tensor) -> torch.Tensor:
            h = nn.functional.gelu(self.conv1(input_features))
            h = nn.functional.gelu(self.conv2(h)).permute(0, 2, 1)
            h = h + self.embed_positions.weight[: h.shape[1]]
            for layer in self.layers:
                h = layer(h, None)
            return self.layer_norm(h)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = AnyFrames(hf.encoder)
            self.cross = nn.ModuleList([layer.encoder_attn for layer in hf.decoder.layers])

        def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h = self.encoder(input_features)
            cross: list[Any] = list(self.cross)
            keys = torch.stack([heads(a.k_proj(h)) for a in cross])
            values = torch.stack([heads(a.v_proj(h)) for a in cross])
            return h, keys, values

    class DecoderStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = hf.decoder
            # One [d_model, vocab] copy of the tied embedding serves both the token lookup
            # and the output projection, so the graph stores it once, not twice.
            self.table = nn.Parameter(hf.decoder.embed_tokens.weight.detach().T.contiguous())

        def forward(self, tokens: torch.Tensor, past_key: torch.Tensor,
                    past_value: torch.Tensor, *cross: torch.Tensor) -> tuple[torch.Tensor, ...]:
            dec = self.decoder
            n = len(dec.layers)
            cross_key, cross_value = cross[:n], cross[n:]
            past, t = past_key.shape[3], tokens.shape[1]
            positions = torch.arange(t, device=tokens.device) + past
            x = self.table[:, tokens].permute(1, 2, 0) + dec.embed_positions.weight[positions]
            # Query i (absolute position past+i) sees keys 0..past+i.
            keys_pos = torch.arange(past + t, device=tokens.device)
            mask = torch.where(keys_pos[None, :] > positions[:, None],
                               torch.tensor(float("-inf")), torch.tensor(0.0))
            new_k, new_v = [], []
            for i, layer in enumerate(dec.layers):
                sa = layer.self_attn
                h = layer.self_attn_layer_norm(x)
                k = torch.cat([past_key[i], heads(sa.k_proj(h))], dim=2)
                v = torch.cat([past_value[i], heads(sa.v_proj(h))], dim=2)
                new_k.append(k)
                new_v.append(v)
                x = x + sa.out_proj(attend(heads(sa.q_proj(h)), k, v, mask))
                ca = layer.encoder_attn
                h = layer.encoder_attn_layer_norm(x)
                x = x + ca.out_proj(attend(heads(ca.q_proj(h)), cross_key[i], cross_value[i],
                                           None))
                h = layer.final_layer_norm(x)
                x = x + layer.fc2(torch.nn.functional.gelu(layer.fc1(h)))
            x = dec.layer_norm(x)
            logits = torch.matmul(x, self.table)
            return logits, torch.stack(new_k), torch.stack(new_v)

    return Encoder().eval(), DecoderStep().eval()


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
            inputs: list[str], outputs: list[str], axes: dict[str, dict[int, str]]) -> None:
    import torch

    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but it handles the
        # data-dependent cache offset without guards; its warnings are not the user's concern.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)


def export_whisper(name: str, out_dir: Path) -> ModelCard:
    """Export zoo model `name` to `out_dir`: encoder.onnx, decoder.onnx, tokenizer.json and
    card.json. Files appear only when everything succeeded."""
    loaded = load_whisper(locate_checkpoint(name))
    return export_loaded(loaded, name, out_dir, {"zoo": name, **loaded.checkpoint.versions})


def export_loaded(loaded: LoadedWhisper, name: str, out_dir: Path,
                  source: dict[str, Any]) -> ModelCard:
    """Export a loaded Whisper as model `name` (`source`: the card's record of where its
    weights came from) to `out_dir`, as `export_whisper` does."""
    import torch

    decoding = whisper_decoding(loaded)
    cfg = loaded.model.config
    encoder, decoder = _modules(loaded)
    mel = LogMelSpec(n_mels=cfg.num_mel_bins)
    n_frames = 2 * cfg.max_source_positions
    L, H, D = decoding.n_layers, decoding.n_heads, decoding.head_dim
    kv_axes = {1: "batch", 3: "past"}
    with staging_dir(out_dir) as stage, torch.no_grad():
        feats = torch.zeros(1, cfg.num_mel_bins, n_frames)
        _export(encoder, (feats,), stage / ENCODER_FILE, ["input_features"],
                ["last_hidden_state", "cross_key", "cross_value"],
                {"input_features": {0: "batch", 2: "frames"},
                 "last_hidden_state": {0: "batch", 1: "positions"},
                 "cross_key": {1: "batch", 3: "positions"},
                 "cross_value": {1: "batch", 3: "positions"}})
        cross = [torch.zeros(1, H, cfg.max_source_positions, D) for _ in range(2 * L)]
        past = torch.zeros(L, 1, H, 3, D)
        tokens = torch.zeros(1, 2, dtype=torch.int64)
        cross_names = cross_input_names(L)
        _export(decoder, (tokens, past, past, *cross), stage / DECODER_FILE,
                ["tokens", "past_key", "past_value", *cross_names],
                ["logits", "present_key", "present_value"],
                {"tokens": {0: "batch", 1: "tokens"}, "past_key": kv_axes,
                 "past_value": kv_axes,
                 **{name: {0: "batch", 2: "positions"} for name in cross_names},
                 "logits": {0: "batch", 1: "tokens"}, "present_key": {1: "batch", 3: "total"},
                 "present_value": {1: "batch", 3: "total"}})
        graphs = {}
        for key, file in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE)):
            onnx.checker.check_model(str(stage / file))
            graphs[key] = graph_spec_from_onnx(onnx.load(str(stage / file),
                                                         load_external_data=False), file)
        shutil.copyfile(loaded.checkpoint.tokenizer_json, stage / TOKENIZER_FILE)
        card = ModelCard(
            name=name,
            family="whisper",
            graphs=graphs,
            objective="whisper-teacher-forced",
            source={**source,
                    "exporter": f"torch {torch.__version__} TorchScript, opset {OPSET}",
                    "format": EXPORT_FORMAT},
            preprocessing=mel.to_dict(),
            tokenizer=TOKENIZER_FILE,
            decoding=decoding,
        )
        card.save(stage)
    return card
