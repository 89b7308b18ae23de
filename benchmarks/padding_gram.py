"""How much of GPTQ's Gram matrices the encoder's padded frames make, and GPTQ's layer-output
error on audio and padding frames when the Gram counts them less (BENCHMARKS.md, issue 10).

    SFC_CACHE=... python benchmarks/padding_gram.py [--model whisper-tiny.en] [--fit 48] [--test 24]

For each weighted attention q/out and fc1/fc2 MatMul of the FP32 encoder: the Gram matrix
of its input over the first FIT calibration clips, split into audio frames (the first
(content + 2) // 2 of a window: frame j reads log-mel frames 2j - 1 .. 2j + 1) and padding
frames; GPTQ (4/32 attention, 4/128 fc, sfc's defaults) from the whole sum, from the audio
frames alone, and with padding weighted 0.1; each rounding's output error on the next TEST
clips' audio and padding frames, relative to the audio frames' output energy.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from sfc.eval.manifest import read_manifest
from sfc.models import model_folder
from sfc.paths import BUNDLED_DATA
from sfc.quant.gptq import GptqConfig, gptq_quantize
from sfc.quant.spec import QuantSpec
from sfc.quant.weights import dequantize_weight
from sfc.runtime.audio import load_audio
from sfc.runtime.features import LogMelSpec, whisper_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--fit", type=int, default=48)
    parser.add_argument("--test", type=int, default=24)
    args = parser.parse_args()
    model = onnx.load(str(model_folder(args.model) / "encoder.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    layers = {n.name: (n.input[0], numpy_helper.to_array(inits[n.input[1]]))
              for n in model.graph.node
              if n.op_type == "MatMul" and n.input[1] in inits and "/encoder/layers." in n.name
              and any(k in n.name for k in ("fc1", "fc2", "q_proj", "out_proj"))}
    inputs = sorted({x for x, _ in layers.values()})
    for x in inputs:
        model.graph.output.append(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options)
    clips = read_manifest(BUNDLED_DATA / "calib")[: args.fit + args.test]

    def run(clip: object) -> tuple[int, dict[str, np.ndarray]]:
        window = whisper_windows(load_audio(clip.audio), LogMelSpec())[:1]  # type: ignore[attr-defined]
        content = int(np.flatnonzero(np.any(window[0] != 0, axis=0))[-1]) + 1
        values = session.run(inputs, {"input_features": window})
        return (content + 2) // 2, {x: v.reshape(-1, v.shape[-1]).astype(np.float64)
                                    for x, v in zip(inputs, values, strict=True)}

    audio_gram = {x: 0.0 for x in inputs}
    pad_gram = {x: 0.0 for x in inputs}
    rows = {x: [0, 0] for x in inputs}
    for clip in clips[: args.fit]:
        n, values = run(clip)
        for x, v in values.items():
            audio_gram[x] = audio_gram[x] + v[:n].T @ v[:n]
            pad_gram[x] = pad_gram[x] + v[n:].T @ v[n:]
            rows[x][0] += n
            rows[x][1] += len(v) - n
    test = [run(clip) for clip in clips[args.fit:]]
    for name, (x, w) in layers.items():
        a, p = np.asarray(audio_gram[x]), np.asarray(pad_gram[x])
        spec = QuantSpec(4, "block", axis=0, block_size=128 if "fc" in name else 32)
        cells = []
        for label, gram, count in (("all", a + p, sum(rows[x])), ("audio", a, rows[x][0]),
                                   ("pad 0.1", a + 0.1 * p, rows[x][0] + rows[x][1] // 10)):
            q, scales = gptq_quantize(w, gram, count, spec, GptqConfig())
            delta = dequantize_weight(q, spec, scales) - w
            on_audio = on_pad = energy = 0.0
            for n, values in test:
                err = (values[x] @ delta) ** 2
                on_audio += err[:n].sum()
                on_pad += err[n:].sum()
                energy += ((values[x][:n] @ w) ** 2).sum()
            cells.append(f"{label}: audio {on_audio / energy:.3e} pad {on_pad / energy:.3e}")
        share = np.trace(p) / np.trace(a + p)
        print(f"{name:44s} padding rows {rows[x][1] / sum(rows[x]):.2f} trace {share:.2f} | "
              + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
