"""Property-based fuzzing (hypothesis) of the loaders users feed files to: audio, ONNX
sources and `sfc check`, recipe.json and card.json.

Every generated input must end in a correct result or a one-line SfcError, reading and
writing only where it may (`fuzz.contract`, shared with the atheris harnesses in
tests/fuzz/). Runs are derandomized (the same examples on every machine) and bounded.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import operator
import struct
from typing import Any

import numpy as np
import onnx
import pytest
from fuzz.contract import (
    EXTERNAL_FILE,
    audio_target,
    card_target,
    onnx_target,
    recipe_target,
)
from fuzz.seeds import CORPUS, SEEDS, audio_bytes, card_seeds, onnx_seeds, recipe_seeds, tone
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from sfc.runtime.audio import SAMPLE_RATE, SILENCE_DBFS

# Reproducible in CI: derandomized, no example database; the deadline only catches hangs.
FUZZ = settings(derandomize=True, database=None, deadline=10_000, max_examples=200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("target", sorted(SEEDS))
def test_seed_corpus_loads(target: str) -> None:
    """The committed corpus holds the seeds `fuzz.seeds` makes, and each one that is a
    valid file loads (all but the empty and the NaN audio file)."""
    from fuzz import contract

    folder = CORPUS / target
    assert sorted(p.name for p in folder.iterdir()) == sorted(SEEDS[target]())
    invalid = {"empty.wav", "nan_float.wav"}
    for path in folder.iterdir():
        result = getattr(contract, f"{target}_target")(path.read_bytes())
        assert (result is None) == (path.name in invalid), path.name


# --- audio -----------------------------------------------------------------------------

FORMATS = [("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"),
           ("WAV", "FLOAT"), ("WAV", "DOUBLE"), ("FLAC", "PCM_S8"), ("FLAC", "PCM_16"),
           ("FLAC", "PCM_24")]
RATES = st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000]) | \
    st.integers(8000, 192000)
U32 = st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF)


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` cut short, with header bytes overwritten, or with a 32-bit header field (RIFF
    size, fmt size, rate, byte rate, data size for WAV) set to a drawn, often huge, value."""
    how = draw(st.sampled_from(["cut", "bytes", "field"]))
    if how == "cut":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if how == "bytes":
        at = draw(st.integers(0, 63))
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at + 8:]
    at = draw(st.sampled_from([4, 16, 20, 24, 28, 32, 40]))
    return data[:at] + struct.pack("<I", draw(U32)) + data[at + 4:]


@FUZZ
@given(fmt=st.sampled_from(FORMATS), rate=RATES, channels=st.integers(1, 8),
       frames=st.integers(0, 400), level=st.sampled_from([0.5, 1.0, 4.0, 1e-5, 0.0]),
       bad=st.sampled_from([None, np.nan, np.inf, -np.inf, 3.4e38]), data=st.data())
def test_audio_files_load_or_fail_in_one_line(fmt: tuple[str, str], rate: int, channels: int,
                                              frames: int, level: float, bad: float | None,
                                              data: st.DataObject) -> None:
    if fmt[0] == "FLAC" and rate > 65535:
        rate -= rate % 10  # FLAC stores rates above 65535 Hz in tens of Hz
    samples = tone(rate, frames, channels) * np.float32(level / 0.5)
    spiked = bad is not None and fmt[1] in ("FLOAT", "DOUBLE") and frames > 0
    if spiked:
        samples[frames // 2, 0] = bad
    raw = audio_bytes(samples, rate, *fmt)
    intact = not data.draw(st.booleans(), "damage")
    if not intact:
        raw = data.draw(damaged(raw), "damaged")
    result = audio_target(raw)
    finite_spike = spiked and bad is not None and math.isfinite(bad)
    loud = 20 * math.log10(max(level, 1e-12)) > SILENCE_DBFS or finite_spike
    valid = frames > 0 and loud and (finite_spike or not spiked)
    if intact and not (level == 1e-5 and "8" in fmt[1]):  # 8-bit rounds -100 dB to 0 or 1 LSB
        assert (result is not None) == valid
    if intact and result is not None:
        # scipy's resample_poly makes ceil(frames * up / down) samples.
        assert result.shape == (math.ceil(frames * SAMPLE_RATE / rate),)


# --- recipe.json and card.json: JSON trees with one node changed -----------------------

_TRICKY = st.sampled_from([1e308, 2**70, -1, 0, 0.5, "", "../secret.json", "/etc/passwd",
                           "weights.bin", True, float("nan"), float("inf")])
JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | _TRICKY,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                              max_size=3),
    max_leaves=8)


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path (keys and indices) of every node of a JSON tree, the root's `()` first."""
    keys = tree if isinstance(tree, dict) else range(len(tree)) if isinstance(tree, list) else ()
    return [prefix, *(p for k in keys for p in _paths(tree[k], (*prefix, k)))]


@st.composite
def mutated(draw: st.DrawFn, tree: Any) -> Any:
    """A copy of `tree` with one node, drawn uniformly from all of them, replaced by a drawn
    value, deleted, or (a container) given an extra member."""
    path = draw(st.sampled_from(_paths(tree)))
    if not path:
        return draw(JSON)
    tree = copy.deepcopy(tree)
    parent = functools.reduce(operator.getitem, path[:-1], tree)
    key, node = path[-1], parent[path[-1]]
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "delete":
        del parent[key]
    elif action == "add" and isinstance(node, dict):
        node[draw(st.text(max_size=8))] = draw(JSON)
    elif action == "add" and isinstance(node, list):
        node.append(draw(JSON))
    else:
        parent[key] = draw(JSON)
    return tree


def _documents(seeds: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    """Seed documents with 1 to 3 nodes changed, written as JSON (NaN and Infinity
    allowed, as Python's json writes them)."""
    trees = [json.loads(v) for _, v in sorted(seeds.items())]

    @st.composite
    def document(draw: st.DrawFn) -> bytes:
        tree = draw(st.sampled_from(trees))
        for _ in range(draw(st.integers(1, 3))):
            tree = draw(mutated(tree))
        return json.dumps(tree).encode()

    return document()


_TEXT_EDGES = {"empty": b"", "not utf-8": b"\xff\xfe\x00", "deep": b"[" * 100_000,
               "long int": b'{"_type": ' + b"1" * 5000 + b"}", "NaN": b"NaN",
               "data a list": b'{"_type": "Recipe", "_version": 2, "_data": []}'}


@pytest.mark.parametrize("edge", _TEXT_EDGES)
def test_json_edge_cases_fail_in_one_line(edge: str) -> None:
    data = _TEXT_EDGES[edge]
    assert recipe_target(data) is None and card_target(data) is None


@settings(FUZZ, max_examples=300)
@given(_documents(recipe_seeds()) | st.binary(max_size=64))
def test_recipe_json_loads_or_fails_in_one_line(data: bytes) -> None:
    recipe_target(data)


@settings(FUZZ, max_examples=300)
@given(_documents(card_seeds()) | st.binary(max_size=64))
def test_card_json_loads_or_fails_in_one_line(data: bytes) -> None:
    card_target(data)


# --- ONNX sources and `sfc check` --------------------------------------------------------

_LOCATIONS = st.sampled_from([EXTERNAL_FILE, "missing.bin", "../secret.bin", "/etc/hostname",
                              "sub/../../secret.bin", "", ".", "src", EXTERNAL_FILE + "\x00"])


@st.composite
def onnx_mutation(draw: st.DrawFn, model: onnx.ModelProto) -> None:
    """Change `model` in place in one drawn way: drop an initializer, close a cycle, move a
    tensor to (possibly missing or escaping) external data, poison values, retype a tensor,
    a graph input or output or a node, or change an attribute or version."""
    graph = model.graph
    how = draw(st.sampled_from(["drop", "cycle", "external", "values", "dtype", "io", "op",
                                "attr", "version"]))
    inits, nodes = graph.initializer, graph.node
    if how == "drop" and inits:
        del inits[draw(st.integers(0, len(inits) - 1))]
    elif how == "cycle" and nodes:  # a node reads its own output or a later node's
        node = nodes[draw(st.integers(0, len(nodes) - 1))]
        later = nodes[draw(st.integers(list(nodes).index(node), len(nodes) - 1))]
        node.input.append(later.output[0])
    elif how == "external" and inits:
        tensor = inits[draw(st.integers(0, len(inits) - 1))]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", draw(_LOCATIONS)),
                           ("offset", str(draw(st.integers(-1, 300)))),
                           ("length", str(draw(st.integers(-1, 300))))):
            tensor.external_data.add(key=key, value=value)
    elif how == "values" and inits:
        tensor = inits[draw(st.integers(0, len(inits) - 1))]
        if tensor.data_type == TensorProto.FLOAT and tensor.raw_data:
            values = np.frombuffer(tensor.raw_data, np.float32).copy()
            values[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from(
                [np.nan, np.inf, -np.inf, 0.0, -1.0, 1e-45]))
            tensor.raw_data = values.tobytes()
    elif how == "dtype" and inits:
        inits[draw(st.integers(0, len(inits) - 1))].data_type = draw(st.integers(0, 30))
    elif how == "io":  # an input or output of an undefined element type, or not a tensor
        value = draw(st.sampled_from([*graph.input, *graph.output]))
        if draw(st.booleans()):
            value.type.tensor_type.elem_type = draw(st.integers(0, 60))
        else:
            value.type.CopyFrom(onnx.helper.make_sequence_type_proto(value.type))
    elif how == "op" and nodes:
        node = nodes[draw(st.integers(0, len(nodes) - 1))]
        node.op_type = draw(st.sampled_from(["", "Foo", "Add", "QuantizeLinear",
                                             "DequantizeLinear", "If", "Gemm", "Conv"]))
        node.domain = draw(st.sampled_from(["", "ai.onnx", "com.microsoft", "trt.plugins"]))
        node.name = draw(st.sampled_from(["", "a\nb", "\r", "ü", node.name]))
    elif how == "attr" and nodes:
        node = nodes[draw(st.integers(0, len(nodes) - 1))]
        del node.attribute[:]
        name = draw(st.sampled_from(["axis", "block_size", "output_dtype", "transB"]))
        node.attribute.append(onnx.helper.make_attribute(name, draw(st.integers(-9, 99))))
    elif how == "version":
        model.ir_version = draw(st.integers(-1, 15))
        del model.opset_import[:]
        model.opset_import.append(onnx.helper.make_opsetid("", draw(st.integers(-1, 30))))


@st.composite
def onnx_files(draw: st.DrawFn) -> bytes:
    """A seed model with 1 to 3 structural mutations, its bytes sometimes damaged too."""
    seeds = onnx_seeds()
    model = onnx.load_from_string(seeds[draw(st.sampled_from(sorted(seeds)))])
    for _ in range(draw(st.integers(1, 3))):
        draw(onnx_mutation(model))
    data = model.SerializeToString()
    if draw(st.booleans()):
        return data
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    return data[:at] + draw(st.binary(max_size=4)) + data[at + draw(st.integers(0, 4)):]


@FUZZ
@given(onnx_files())
@example(b"")
@example(b"\x08\x07")  # ir_version 7 and nothing else: no graph
def test_onnx_sources_and_checks_end_in_one_line(data: bytes) -> None:
    onnx_target(data)
