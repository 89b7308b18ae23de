"""The TensorRT engine runner on stand-in engines: what crosses the bus per decoder step.

TensorRT and pycuda cannot be installed here. The stand-ins follow the documented
execution API (named tensors, `set_input_shape` refusing shapes outside the optimisation
profile, `set_tensor_address`, `execute_async_v3`) and compute a toy function of every
input, so a cache or cross K/V that went missing or stale changes the tokens. Shapes,
names and profiles are the real ones: the whisper-tiny.en export's model card and
`profiles_for`. A counting `DeviceMemory` measures host-to-device and device-to-host bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from sfc.card import ModelCard, WhisperDecoding
from sfc.errors import SfcError
from sfc.runtime.cross import STACKED, cross_feed, cross_input_names
from sfc.runtime.decoding import DecoderStep, greedy_decode
from sfc.runtime.features import LogMelSpec
from sfc.runtime.trt_session import TrtSession, engine_io
from sfc.runtime.whisper import WhisperRuntime
from sfc.targets.tensorrt_plan import ProfileLimits, profiles_for

TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="input", OUTPUT="output"),
                      nptype=np.dtype)
Shapes = dict[str, tuple[int, ...]]
Arrays = dict[str, np.ndarray]


class CountingMemory:
    """Device memory as host arrays, counting the bytes each way."""

    stream = 7

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.next = 1 << 20
        self.htod_bytes = self.dtoh_bytes = self.allocs = 0

    def alloc(self, nbytes: int) -> int:
        self.allocs += 1
        address, self.next = self.next, self.next + max(1, nbytes) + 256
        self.buffers[address] = np.zeros(max(1, nbytes), np.uint8)
        return address

    def htod(self, dst: int, src: np.ndarray) -> None:
        self.write(dst, src)
        self.htod_bytes += src.nbytes

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        dst[...] = self.read(src, dst.shape, dst.dtype)
        self.dtoh_bytes += dst.nbytes

    def free(self, ptr: int) -> None:
        del self.buffers[ptr]

    # What the engine does on the device (not bus traffic).
    def write(self, dst: int, value: np.ndarray) -> None:
        raw = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
        assert raw.size <= self.buffers[dst].size, "write past the end of a device buffer"
        self.buffers[dst][: raw.size] = raw

    def read(self, src: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        return self.buffers[src][:n].view(dtype).reshape(shape).copy()


class FakeEngine:
    """Engine + execution context for one graph of the card, computing `compute`."""

    def __init__(self, card: ModelCard, graph: str, limits: ProfileLimits,
                 out_shapes: Callable[[Shapes], Shapes], compute: Callable[[Arrays], Arrays],
                 memory: CountingMemory) -> None:
        spec = card.graphs[graph]
        self.dtypes = {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)}
        self.modes = {**{t.name: TRT.TensorIOMode.INPUT for t in spec.inputs},
                      **{t.name: TRT.TensorIOMode.OUTPUT for t in spec.outputs}}
        self.names = list(self.modes)
        self.profile = {p.name: (p.min, p.opt, p.max) for p in profiles_for(card, graph, limits)}
        self.out_shapes, self.compute, self.memory = out_shapes, compute, memory
        self.shapes: Shapes = {}
        self.addresses: dict[str, int] = {}
        self.batches: list[int] = []

    # ICudaEngine
    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.modes[name]

    def get_tensor_dtype(self, name: str) -> str:
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name: str, index: int) -> tuple[tuple[int, ...], ...]:
        assert index == 0
        return self.profile[name]

    # IExecutionContext
    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.profile[name]
        if len(shape) != len(lo) or not all(
                a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.modes[name] == TRT.TensorIOMode.INPUT:
            return self.shapes[name]
        return self.out_shapes(self.shapes)[name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        assert stream == self.memory.stream
        inputs = [n for n in self.names if self.modes[n] == TRT.TensorIOMode.INPUT]
        outputs = [n for n in self.names if n not in inputs]
        read = {self.addresses[n] for n in inputs}
        assert not read & {self.addresses[n] for n in outputs}, "an output aliases an input"
        feeds = {n: self.memory.read(self.addresses[n], self.shapes[n], self.dtypes[n])
                 for n in inputs}
        self.batches.append(feeds[inputs[0]].shape[0])  # tokens / input_features: [B, ...]
        shapes = self.out_shapes(self.shapes)
        for name, value in self.compute(feeds).items():
            assert value.shape == shapes[name]
            self.memory.write(self.addresses[name], value.astype(self.dtypes[name]))
        return True


def _decoder_shapes(dec: WhisperDecoding) -> Callable[[Shapes], Shapes]:
    def shapes(s: Shapes) -> Shapes:
        (batch, tokens), past = s["tokens"], s["past_key"][3]
        kv = (dec.n_layers, batch, dec.n_heads, past + tokens, dec.head_dim)
        return {"logits": (batch, tokens, dec.vocab_size), "present_key": kv,
                "present_value": kv}
    return shapes


def _toy_decoder(dec: WhisperDecoding) -> Callable[[Arrays], Arrays]:
    """Logits peaked at a token that depends on every cached position and the cross K/V."""

    def compute(x: Arrays) -> Arrays:
        tokens = x["tokens"].astype(np.float32)  # [B, T]
        new = np.broadcast_to(tokens[None, :, None, :, None],
                              (dec.n_layers, *tokens.shape[:1], dec.n_heads, tokens.shape[1],
                               dec.head_dim))
        k = np.concatenate([x["past_key"], new * 1e-3], axis=3)
        v = np.concatenate([x["past_value"], new * -2e-3], axis=3)
        positions = np.arange(1, k.shape[3] + 1, dtype=np.float64)
        cross_k, cross_v = (np.stack([x[f"{kind}_{i}"] for i in range(dec.n_layers)])
                            for kind in STACKED)  # the engine takes them per layer
        mix = (k[0, :, 0, :, 0] @ positions + v[-1, :, -1, :, -1] @ positions ** 2
               + cross_k[:, :, 0, :, 0].sum(axis=(0, 2))
               - cross_v[:, :, -1, :, -1].sum(axis=(0, 2)))
        target = (np.abs(mix) * 1e4).astype(np.int64) % 40000 + 300  # [B]: never eot
        vocab = np.arange(dec.vocab_size)
        logits = -np.abs(vocab[None, None, :] - target[:, None, None]).astype(np.float32)
        return {"logits": np.repeat(logits, tokens.shape[1], axis=1),
                "present_key": k, "present_value": v}

    return compute


def _encoder_shapes(dec: WhisperDecoding) -> Callable[[Shapes], Shapes]:
    def shapes(s: Shapes) -> Shapes:
        batch = s["input_features"][0]
        kv = (dec.n_layers, batch, dec.n_heads, 1500, dec.head_dim)
        return {"last_hidden_state": (batch, 1500, dec.n_heads * dec.head_dim),
                "cross_key": kv, "cross_value": kv}
    return shapes


def _toy_encoder(dec: WhisperDecoding) -> Callable[[Arrays], Arrays]:
    def compute(x: Arrays) -> Arrays:
        row = x["input_features"].mean(axis=(1, 2))  # [B]
        kv = np.broadcast_to(row[None, :, None, None, None],
                             (dec.n_layers, row.size, dec.n_heads, 1500, dec.head_dim))
        hidden = np.zeros((row.size, 1500, dec.n_heads * dec.head_dim), np.float32)
        return {"last_hidden_state": hidden, "cross_key": kv, "cross_value": kv * 0.5}
    return compute


def _session(card: ModelCard, graph: str, limits: ProfileLimits) -> tuple[TrtSession,
                                                                         FakeEngine]:
    dec = card.decoding
    assert dec is not None
    memory = CountingMemory()
    shapes, compute = ((_decoder_shapes(dec), _toy_decoder(dec)) if graph == "decoder"
                       else (_encoder_shapes(dec), _toy_encoder(dec)))
    engine = FakeEngine(card, graph, limits, shapes, compute, memory)
    return TrtSession(engine, engine, engine_io(engine, engine, TRT), memory), engine


def _runtime(folder: Path, encoder: Any, decoder: Any) -> WhisperRuntime:
    card = ModelCard.load(folder)
    assert card.decoding is not None and card.tokenizer is not None
    return WhisperRuntime(card=card, decoding=card.decoding,
                          mel=LogMelSpec.from_dict(card.preprocessing or {}), encoder=encoder,
                          decoder=decoder, tokenizer=Tokenizer.from_file(
                              str(folder / card.tokenizer)), guard=None)


class RunOnly:
    """Only ORT's `run` interface: the runtime treats it as an ONNX Runtime session."""

    def __init__(self, session: TrtSession) -> None:
        self.run = session.run


def _counted(step: DecoderStep, memory: CountingMemory,
             log: list[tuple[int, int, int]]) -> DecoderStep:
    """`step`, recording (cache length read, host-to-device, device-to-host bytes)."""

    def counted(tokens: np.ndarray, past_k: np.ndarray,
                past_v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, d = memory.htod_bytes, memory.dtoh_bytes
        out = step(tokens, past_k, past_v)
        log.append((len(log), memory.htod_bytes - h, memory.dtoh_bytes - d))
        return out

    return counted


def test_decoder_cache_stays_on_the_device(tiny_export: Path) -> None:
    card = ModelCard.load(tiny_export)
    dec = card.decoding
    assert dec is not None
    spec = {t.name: t for t in card.graphs["decoder"].inputs}
    assert list(spec) == ["tokens", "past_key", "past_value",
                          *cross_input_names(dec.n_layers)]
    rng = np.random.default_rng(0)
    cross_shape = (dec.n_layers, 1, dec.n_heads, 1500, dec.head_dim)
    cross_k = rng.standard_normal(cross_shape).astype(np.float32)
    cross_v = rng.standard_normal(cross_shape).astype(np.float32)
    steps = 32
    compute = _toy_decoder(dec)

    def reference(tokens: np.ndarray, past_k: np.ndarray,
                  past_v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = compute({"tokens": tokens, "past_key": past_k, "past_value": past_v,
                       **cross_feed(spec, cross_k, cross_v)})
        return out["logits"], out["present_key"], out["present_value"]

    want = greedy_decode(reference, dec, 1, max_new_tokens=steps, guard=None).ids
    assert len(want[0]) == steps and len(set(want[0])) > steps // 2  # the toy moves on

    logs: dict[str, list[tuple[int, int, int]]] = {}
    for mode in ("every input per call", "resident"):
        session, engine = _session(card, "decoder", ProfileLimits())
        decoder = RunOnly(session) if mode == "every input per call" else session
        step = _runtime(tiny_export, None, decoder).step_fn(cross_k, cross_v)
        log = logs[mode] = []
        got = greedy_decode(_counted(step, engine.memory, log), dec, 1,
                            max_new_tokens=steps, guard=None).ids
        assert got == want, mode
        allocs = engine.memory.allocs
        again = greedy_decode(step, dec, 1, max_new_tokens=steps, guard=None).ids
        assert again == want, f"{mode}: a second decode with the same step starts over"
        assert engine.memory.allocs == allocs, "buffers are allocated once, not per call"

    # Before: every call copies every input (tokens, the whole cache, the cross K/V).
    token = np.dtype(spec["tokens"].dtype).itemsize
    cache_row = dec.n_layers * dec.n_heads * dec.head_dim * 4  # bytes per cached position
    cross = 2 * math.prod(cross_shape) * 4
    prompt = len(dec.prompt)
    for i, htod, _ in logs["every input per call"]:
        past = 0 if i == 0 else prompt + i - 1
        assert htod == (prompt if i == 0 else 1) * token + 2 * past * cache_row + cross
    # After: the cross K/V once per decode, then only the new token per step.
    after = logs["resident"]
    assert after[0][1] == prompt * token + cross
    assert all(htod == token for _, htod, _ in after[1:])
    logits = dec.vocab_size * 4
    assert all(dtoh == logits for _, _, dtoh in after[1:])

    i = 16
    before_step, after_step = logs["every input per call"][i], after[i]
    print(f"\nwhisper-tiny.en decoder step {i} (cache of {prompt + i - 1} positions), batch 1: "
          f"host-to-device {before_step[1]:,} B before, {after_step[1]:,} B after; "
          f"device-to-host {before_step[2]:,} B before, {after_step[2]:,} B after")
    print(f"whole decode of {steps} steps: host-to-device "
          f"{sum(h for _, h, _ in logs['every input per call']):,} B before, "
          f"{sum(h for _, h, _ in after):,} B after")


def test_loop_refuses_to_continue_after_another_run(tiny_export: Path) -> None:
    card = ModelCard.load(tiny_export)
    dec = card.decoding
    assert dec is not None
    session, _ = _session(card, "decoder", ProfileLimits())
    cross = np.zeros((dec.n_layers, 1, dec.n_heads, 1500, dec.head_dim), np.float32)
    empty = cross[:, :, :, :0]
    names = {t.name for t in card.graphs["decoder"].inputs}
    loop = session.loop(cross_feed(names, cross, cross),
                        {"past_key": empty, "past_value": empty},
                        {"present_key": "past_key", "present_value": "past_value"})
    tokens = np.asarray([dec.prompt], np.int64)
    loop.run({"tokens": tokens}, ["logits"])
    session.run(["logits"], {"tokens": tokens, "past_key": empty, "past_value": empty,
                             **cross_feed(names, cross, cross)})
    with pytest.raises(SfcError, match="since the loop started"):
        loop.run({"tokens": tokens[:, :1]}, ["logits"])
    with pytest.raises(SfcError, match="cannot carry"):
        session.loop({}, {}, {"present_key": "past_key"})


def test_runtime_batches_and_decodes_within_the_engine_profiles(tiny_export: Path) -> None:
    card = ModelCard.load(tiny_export)
    dec = card.decoding
    assert dec is not None
    limits = ProfileLimits(max_batch=2, max_decoder_steps=40)
    encoder, enc_engine = _session(card, "encoder", limits)
    decoder, dec_engine = _session(card, "decoder", limits)
    rt = _runtime(tiny_export, encoder, decoder)
    assert rt.max_batch > 2
    size, new_tokens = rt.limits()
    assert size == 2 and new_tokens is not None
    windows = np.stack([np.full((80, 3000), w, np.float32) for w in range(5)])
    out = rt.decode_windows(windows)
    assert len(out) == 5
    assert max(enc_engine.batches) == 2 and max(dec_engine.batches) == 2
    assert sorted(enc_engine.batches) == [1, 2, 2]
    assert all(t.text for t in out)
    # The toy decoder never ends a window: it runs to the cap, which the profile fits ...
    cross = np.zeros((dec.n_layers, 1, dec.n_heads, 1500, dec.head_dim), np.float32)
    step = rt.step_fn(cross, cross)
    assert len(greedy_decode(step, dec, 1, max_new_tokens=new_tokens, guard=None).ids[0]) \
        == new_tokens
    # ... and one more token would feed the engine a cache longer than its profile.
    with pytest.raises(SfcError, match="outside the engine's optimisation profile"):
        greedy_decode(rt.step_fn(cross, cross), dec, 1, max_new_tokens=new_tokens + 1,
                      guard=None)


def test_onnx_runtime_sessions_keep_the_runtime_batch(tiny_export: Path) -> None:
    card = ModelCard.load(tiny_export)
    session, _ = _session(card, "decoder", ProfileLimits())
    rt = _runtime(tiny_export, RunOnly(session), RunOnly(session))
    assert rt.limits() == (rt.max_batch, None)
