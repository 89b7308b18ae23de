"""TensorRT target: every build decision in plain Python, and the no-TensorRT stop.

TensorRT cannot be installed on sfc's development and CI machines; the engine build itself
is covered by the test marked `tensorrt`, which skips here with its reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from test_quant_graphs import absmax_scales, feeds_for, mlp_model

from sfc.card import ModelCard
from sfc.errors import SfcError
from sfc.quant import (
    TENSORRT_CAPS,
    PlanConfig,
    make_plan,
    model_sha256,
    recipe_from_plan,
    write_qdq,
)
from sfc.targets import TensorRTTarget, get_target
from sfc.targets.tensorrt import ENGINE, TRT_ONNX, tensorrt_available
from sfc.targets.tensorrt_plan import (
    ProfileLimits,
    TrtVersion,
    engine_settings,
    plugins_in,
    precision_table,
    profiles_for,
    quantized_types,
)
from sfc.targets.trt_rewrites import PLUGIN_OP, substitute_plugins


def _qdq(weight_bits: int, activations: bool = True) -> onnx.ModelProto:
    model = mlp_model()
    config = PlanConfig(weight_bits=weight_bits, activation_bits=8 if activations else None,
                        block_size=16)
    plan = make_plan(model, config, TENSORRT_CAPS)
    scales = absmax_scales(model, feeds_for(model), [q.tensor for q in plan.activations])
    return write_qdq(model, recipe_from_plan(plan, scales, model_sha256(model), 0,
                                             config.to_dict()))


@pytest.mark.parametrize(("text", "version"), [("10.3", (10, 3)), ("10.16.2", (10, 16)),
                                               ("11", (11, 0)), (" 11.1 ", (11, 1))])
def test_version_parsing(text: str, version: tuple[int, int]) -> None:
    assert TrtVersion.parse(text) == TrtVersion(*version)


@pytest.mark.parametrize("bad", ["8.5", "ten", "10.x", ""])
def test_bad_versions_are_one_line_errors(bad: str) -> None:
    with pytest.raises(SfcError, match="TensorRT"):
        TrtVersion.parse(bad)


def test_version_facts() -> None:
    jetpack6, x86, trt11 = (TrtVersion.parse(v) for v in ("10.3", "10.16", "11"))
    assert not jetpack6.strongly_typed and x86.strongly_typed and trt11.strongly_typed
    assert TrtVersion.parse("10.12").strongly_typed and not TrtVersion.parse("10.11").strongly_typed
    assert not jetpack6.python_plugins and x86.python_plugins and x86.aot_plugins
    assert TrtVersion.parse("10.6").python_plugins and not TrtVersion.parse("10.6").aot_plugins


def test_registry_parses_the_version() -> None:
    target = get_target("tensorrt:10.3")
    assert isinstance(target, TensorRTTarget) and target.version == TrtVersion(10, 3)
    assert get_target("tensorrt").version is None  # type: ignore[attr-defined]
    with pytest.raises(SfcError, match="takes no version"):
        get_target("sim:1.2")
    with pytest.raises(SfcError, match=r"unknown ort-cpu CPU class '1\.2'"):
        get_target("ort-cpu:1.2")
    with pytest.raises(SfcError, match="not a TensorRT version"):
        get_target("tensorrt:new")


def test_whisper_profiles_follow_the_card(tiny_export: Path) -> None:
    card = ModelCard.load(tiny_export)
    enc = {p.name: p for p in profiles_for(card, "encoder", ProfileLimits(max_batch=4))}
    assert enc["input_features"].min == (1, 80, 3000)
    assert enc["input_features"].max == (4, 80, 3000)
    dec = {p.name: p for p in profiles_for(card, "decoder", ProfileLimits())}
    prompt = len(card.decoding.prompt)  # type: ignore[union-attr]
    assert dec["tokens"].min == (1, 1) and dec["tokens"].max == (1, prompt)
    last = card.decoding.max_target_positions - 1  # type: ignore[union-attr]
    assert dec["past_key"].min == (4, 1, 6, 0, 64)
    assert dec["past_key"].opt == (4, 1, 6, 64, 64)
    assert dec["past_key"].max == (4, 1, 6, last, 64)
    assert dec["cross_key_3"].min == dec["cross_key_3"].max == (1, 6, 1500, 64)
    short = {p.name: p for p in profiles_for(card, "decoder",
                                             ProfileLimits(max_decoder_steps=100))}
    assert short["past_value"].max[3] == 99


def test_generic_profiles_fix_symbolic_dims() -> None:
    model = mlp_model()
    card = TensorRTTarget().for_graph(None, "model")  # no card: lowering makes a generic one
    assert card.card is None
    from sfc.card import graph_spec_from_onnx

    generic = ModelCard(name="mlp", family="generic", objective="distortion",
                        graphs={"model": graph_spec_from_onnx(model, "model.onnx")})
    (one,) = profiles_for(generic, "model", ProfileLimits())
    assert one.min == one.max == (1, 32, 64)
    (p,) = profiles_for(generic, "model", ProfileLimits(dims={"B": 8}))
    assert p.min == p.opt == p.max == (8, 32, 64)


def test_builder_flags_per_version() -> None:
    card = ModelCard(name="mlp", family="generic", objective="distortion", graphs={})
    int8, int4 = _qdq(8), _qdq(4, activations=False)
    assert quantized_types(int8) == {"INT8"} and quantized_types(int4) == {"INT4"}

    def settings(model: onnx.ModelProto, version: str):  # type: ignore[no-untyped-def]
        from sfc.card import graph_spec_from_onnx

        c = ModelCard(name=card.name, family="generic", objective="distortion",
                      graphs={"model": graph_spec_from_onnx(model, "m.onnx")})
        return engine_settings(model, c, "model", TrtVersion.parse(version),
                               ProfileLimits(dims={"B": 1}), workspace_bytes=1 << 28)

    old = settings(int8, "10.3")
    assert not old.strongly_typed and old.builder_flags == ("INT8", "FP16")
    assert settings(int4, "10.3").builder_flags == ("INT4", "FP16")
    new = settings(int8, "10.16")
    assert new.strongly_typed and new.builder_flags == ()
    assert json.loads(json.dumps(new.to_dict()))["workspace_bytes"] == 1 << 28


def test_int2_layers_become_plugin_nodes_and_need_python_plugins() -> None:
    model = _qdq(2, activations=False)
    assert any(i.data_type == TensorProto.INT2 for i in model.graph.initializer)
    assert substitute_plugins(model) == 2
    onnx.checker.check_model(model)
    assert not any(i.data_type == TensorProto.INT2 for i in model.graph.initializer)
    assert [n.op_type for n in model.graph.node] == [PLUGIN_OP, "Add", "Relu", PLUGIN_OP]
    assert plugins_in(model) == ("sfc::W2A16MatMul",)
    default = next(o.version for o in model.opset_import if o.domain == "")
    assert (default, model.ir_version) == (21, 10)
    node = model.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"sfc" and (attrs["K"], attrs["N"]) == (64, 128)
    packed = next(i for i in model.graph.initializer if i.name == node.input[1])
    assert packed.data_type == TensorProto.UINT8 and packed.dims == [64 * 128 // 4]
    from sfc.card import graph_spec_from_onnx

    card = ModelCard(name="mlp", family="generic", objective="distortion",
                     graphs={"model": graph_spec_from_onnx(model, "m.onnx")})
    for old in ("10.3", "10.8"):  # sfc's plugin is AOT: TensorRT >= 10.9
        with pytest.raises(SfcError, match="AOT Python plugins"):
            engine_settings(model, card, "model", TrtVersion.parse(old),
                            ProfileLimits(dims={"B": 1}))
    assert engine_settings(model, card, "model", TrtVersion.parse("10.9"),
                           ProfileLimits(dims={"B": 1})).plugins == ("sfc::W2A16MatMul",)
    assert substitute_plugins(model) == 0  # idempotent


def test_precision_table_from_inspector_json() -> None:
    info = json.dumps({"Layers": [
        {"Name": "fc1", "LayerType": "gemm",
         "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear INT8 format"}],
         "Outputs": [{"Name": "h", "Format/Datatype": "Half"}], "TacticName": "sm80_xmma"},
        "bare_layer_name",
    ]})
    rows = precision_table(info)
    assert rows[0].inputs == ("INT8",) and rows[0].outputs == ("HALF",)
    assert rows[0].tactic == "sm80_xmma" and rows[1].layer_type == "?"
    with pytest.raises(SfcError, match="not JSON"):
        precision_table("{")


def test_profile_limits_parse_and_print_as_cli_options() -> None:
    assert ProfileLimits.parse_dims(["B=4", " T = 16 "]) == {"B": 4, "T": 16}
    for bad in ("B", "=4", "B=four", "B=-1"):
        with pytest.raises(SfcError, match="NAME=SIZE"):
            ProfileLimits.parse_dims([bad])
    with pytest.raises(SfcError, match="positive size"):
        ProfileLimits(dims={"B": 0})
    assert ProfileLimits().cli_args() == ""
    limits = ProfileLimits(max_batch=4, opt_batch=2, max_decoder_steps=128, dims={"T": 8})
    assert limits.cli_args() == ("--max-batch 4 --opt-batch 2 --max-decoder-steps 128 "
                                 "--dim T=8")


def test_engine_limits_reach_the_tensorrt_target_and_nothing_else() -> None:
    from sfc.build import BuildConfig

    limits = ProfileLimits(max_batch=4)
    target = BuildConfig(target="tensorrt:10.16", activations=None,
                         engine_limits=limits).lowering_target()
    assert isinstance(target, TensorRTTarget) and target.limits == limits
    with pytest.raises(SfcError, match=r"--max-batch 4.*--target tensorrt only"):
        BuildConfig(target="ort-cpu", engine_limits=limits)
    bf16 = BuildConfig(target="tensorrt:10.16", activations=None, trt_float="bf16")
    assert bf16.lowering_target().float_type == "bf16"
    with pytest.raises(SfcError, match=r"--trt-float applies to --target tensorrt only"):
        BuildConfig(target="ort-cpu", trt_float="bf16")
    with pytest.raises(SfcError, match=r"unknown float type 'fp8'"):
        BuildConfig(target="tensorrt:10.16", trt_float="fp8")


@pytest.mark.skipif(tensorrt_available(), reason="checks the stop on machines without TensorRT")
def test_lowering_without_tensorrt_writes_the_ready_onnx_and_says_how_to_finish(
        tmp_path: Path) -> None:
    onnx.save(_qdq(8), str(tmp_path / "model.qdq.onnx"))
    target = TensorRTTarget(version=TrtVersion.parse("10.16"),
                            limits=ProfileLimits(dims={"B": 1}))
    result = target.lower(tmp_path / "model.qdq.onnx", tmp_path)
    assert (tmp_path / TRT_ONNX).is_file() and not (tmp_path / ENGINE).exists()
    assert result.artifact == ENGINE and result.target == "tensorrt:10.16"
    assert any("--from-qdq" in n and "tensorrt:10.16" in n for n in result.notes)
    ops = {n.op_type for n in onnx.load(str(tmp_path / TRT_ONNX)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops  # the Q/DQ graph, lowered


@pytest.mark.tensorrt
def test_engine_builds_and_reports_layer_precisions(tmp_path: Path) -> None:
    if not tensorrt_available():
        pytest.skip("TensorRT is not installed (it cannot be installed on sfc's dev/CI "
                    "machines); run on a GPU machine with TensorRT")
    onnx.save(_qdq(8), str(tmp_path / "model.qdq.onnx"))
    result = TensorRTTarget(limits=ProfileLimits(dims={"B": 1})).lower(
        tmp_path / "model.qdq.onnx", tmp_path)
    assert (tmp_path / ENGINE).is_file() and result.bytes > 0
    layers = json.loads((tmp_path / "model.plan.layers.json").read_text())
    assert any("INT8" in r["inputs"] for r in layers)


def test_plugin_file_runs_in_onnxruntime_like_the_qdq_graph() -> None:
    pytest.importorskip("onnxruntime_extensions")
    import onnxruntime as ort

    from sfc.kernels.ort_ops import session_options

    qdq = _qdq(2, activations=False)
    ready = onnx.ModelProto()
    ready.CopyFrom(qdq)
    substitute_plugins(ready)
    feeds = feeds_for(qdq)
    (want,) = ort.InferenceSession(qdq.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, feeds)
    sess = ort.InferenceSession(ready.SerializeToString(), session_options(),
                                providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, feeds)
    # The plugin rounds activations and its output to fp16 (the W2A16 kernel's types).
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert got.shape == want.shape and rel < 2e-3, rel


def test_plugin_launch_arguments_match_the_compiled_kernel() -> None:
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    from sfc.kernels.trt_plugin import scalar_values

    # A fresh process: test_kernels.py sets TRITON_INTERPRET=1, under which nothing compiles.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from sfc.kernels.aot import compile_lowbit; "
            "print(json.dumps(compile_lowbit(2, 32, arch=87, activation_dtype='float32')"
            ".scalar_args))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    names = json.loads(done.stdout.strip().splitlines()[-1])
    values = dict(zip(names, scalar_values(names, 5, 384, 1536), strict=True))
    assert values["M"] == 5 and values["N"] == 384 and values["K"] == 1536
    assert values.get("stride_xm", 1536) == 1536
    with pytest.raises(SfcError, match="does not know"):
        scalar_values(["M", "mystery"], 1, 2, 3)


def test_int2_weight_read_by_a_gather_falls_back_to_int8_on_tensorrt() -> None:
    from test_quant_graphs import speech_model

    plan = make_plan(speech_model(), PlanConfig(weight_bits=2, activation_bits=None),
                     TENSORRT_CAPS)
    specs = {q.tensor: q for q in plan.weights}
    tied = specs["E"]  # read by the Gather "embed" and the MatMul "lm_head"
    assert tied.spec.bits == 8 and "only as a MatMul plugin" in tied.note
    assert any(q.spec.bits == 2 for q in plan.weights)  # the MatMul-only weights stay INT2


def test_cli_tensorrt_build_stops_after_the_ready_onnx(tmp_path: Path) -> None:
    import subprocess
    import sys

    if tensorrt_available():
        pytest.skip("TensorRT is installed: the build would make the engine")
    onnx.save(mlp_model(), str(tmp_path / "mlp.onnx"))
    out = tmp_path / "b"
    code = ("import sys\nfrom sfc.cli import main\nsys.argv = ['sfc', 'build', "
            f"{str(tmp_path / 'mlp.onnx')!r}, '-o', {str(out)!r}, '--activations', 'none', "
            "'--target', 'tensorrt:10.16', '--dim', 'B=4', '--no-eval']\nmain()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    # The finishing command carries the profile limits the build was asked for.
    assert ("sfc build --from-qdq model/model.trt.onnx -o model --target tensorrt:10.16 "
            "--dim B=4") in " ".join((done.stderr + done.stdout).split())
    assert (out / "model" / TRT_ONNX).is_file() and (out / "card.json").is_file()
    assert ModelCard.load(out).graphs["model"].path == "model/model.plan"
