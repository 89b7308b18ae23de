"""Any `.onnx` file as a source: checked, shapes inferred, described by a generic card."""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import Message

from ..atomic import staging_dir
from ..card import ModelCard, graph_spec_from_onnx
from ..errors import SfcError, first_line

__all__ = ["MODEL_FILE", "export_onnx_file", "load_onnx_source", "require_utf8"]

MODEL_FILE = "model.onnx"
_PROTOBUF_LIMIT = 2**31 - 1  # protobuf's 2 GB limit: larger models need external data


def _undecodable(message: Message) -> str | None:
    """The first string field, at any depth, whose bytes are not UTF-8 (protobuf's Python
    API hands those out as bytes, which no name lookup or JSON writer expects). Only text
    and message fields are read, so tensor payloads are never copied."""
    for field in message.DESCRIPTOR.fields:
        if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
            continue
        value = getattr(message, field.name)
        single = isinstance(value, str | bytes | Message)
        if single and field.type == field.TYPE_MESSAGE and not message.HasField(field.name):
            continue  # an unset message reads as an empty default: nothing below it
        for item in [value] if single else value:
            if field.type == field.TYPE_MESSAGE:
                found = _undecodable(item)
                if found is not None:
                    return found
            elif isinstance(item, bytes):
                return str(field.full_name)
    return None


def require_utf8(model: onnx.ModelProto, label: str | Path) -> None:
    """SfcError when a name or other text field of `model` is not UTF-8."""
    field = _undecodable(model)
    if field is not None:
        raise SfcError(f"{label} is not a valid ONNX model: {field} is not UTF-8 text")


def load_onnx_source(path: str | Path) -> onnx.ModelProto:
    """Load, check and shape-infer an ONNX model (external data and >2 GB models included)."""
    path = Path(path)
    if not path.is_file():
        raise SfcError(f"ONNX file not found: {path}")
    try:
        # The path form of the checker reads external data and works past 2 GB.
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, ValidationError, OSError: all user errors
        raise SfcError(f"{path} is not a valid ONNX model: {first_line(exc)}") from None
    require_utf8(model, path)
    if model.ByteSize() < _PROTOBUF_LIMIT:
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception as exc:
            raise SfcError(f"{path}: shape inference failed: {first_line(exc)}") from None
    return model


def export_onnx_file(src: str | Path, out_dir: Path) -> ModelCard:
    """Copy a checked, shape-inferred `src` into `out_dir` as model.onnx with a generic card."""
    model = load_onnx_source(src)
    with staging_dir(out_dir) as stage:
        large = model.ByteSize() >= _PROTOBUF_LIMIT
        onnx.save(model, str(stage / MODEL_FILE), save_as_external_data=large,
                  location=f"{MODEL_FILE}.data" if large else None)
        card = ModelCard(
            name=Path(src).stem,
            family="generic",
            graphs={"model": graph_spec_from_onnx(model, MODEL_FILE)},
            objective="distortion",
            source={"onnx": str(Path(src).resolve())},
        )
        card.save(stage)
    return card
