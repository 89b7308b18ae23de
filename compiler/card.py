"""The model card: what a folder of graphs is and how to run it.

Every export or build folder holds `card.json`. The runtime, the evaluator and (later)
the compiler read it to know which graph is which, the preprocessing, the tokens that
drive decoding, and which task objective fits the model. It never imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from .atomic import write_json_atomic
from .errors import SfcError

__all__ = [
    "CARD_NAME",
    "MULTILINGUAL_VOCAB",
    "GraphSpec",
    "ModelCard",
    "TensorSpec",
    "WhisperDecoding",
    "graph_spec_from_onnx",
    "language_tokens",
    "special_tokens",
]

CARD_NAME = "card.json"
_VERSION = 1
# OpenAI's rule: multilingual Whisper vocabularies have 51865+ entries, English-only 51864.
MULTILINGUAL_VOCAB = 51865
Tokens = tuple[tuple[str, int], ...]  # (name, token id) pairs


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, element type, and shape (ints or axis names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the model, relative to the folder holding the card."""

    path: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # ORT graph optimisation level to open it with (sfc.runtime.session.OPTIMIZATION):
    # "basic" for fake-quant graphs, whose Q/DQ ORT's extended rewrites must not touch.
    optimization: str = "all"


@dataclass(frozen=True)
class WhisperDecoding:
    """Everything greedy decoding needs; read from the checkpoint's tokenizer and config."""

    # <|startoftranscript|> [<|en|> <|transcribe|>] <|notimestamps|>; `decoding_prompt`
    # puts another language and task in a multilingual model's.
    prompt: tuple[int, ...]
    eot: int
    timestamp_begin: int
    suppress: tuple[int, ...]  # never emitted (non-speech symbols, special tokens)
    suppress_begin: tuple[int, ...]  # not emitted as the first token (blank, eot)
    max_target_positions: int
    n_layers: int
    n_heads: int
    head_dim: int
    vocab_size: int
    # Multilingual checkpoints only (empty for English-only ones): (code, token id) of each
    # language token and (name, token id) of <|transcribe|> and <|translate|>.
    languages: Tokens = ()
    tasks: Tokens = ()


def special_tokens(tokenizer_json: Path) -> dict[str, int]:
    """A Hugging Face tokenizer.json's added (special) tokens: content -> id."""
    tok = json.loads(Path(tokenizer_json).read_text())
    return {t["content"]: int(t["id"]) for t in tok["added_tokens"]}


def language_tokens(special: Mapping[str, int], vocab_size: int) -> tuple[Tokens, Tokens]:
    """The `languages` and `tasks` fields of a `WhisperDecoding` from the tokenizer's special
    tokens; both empty for an English-only vocabulary (its tokenizer lists the language
    tokens too, but the model was never trained on them).

    Whisper's tokenizer lays its special tokens out as <|startoftranscript|>, one token per
    language, <|translate|>, <|transcribe|>: the languages are the tokens in between, so
    checkpoints with more languages (large-v3's <|yue|>) need no list here.
    """
    if vocab_size < MULTILINGUAL_VOCAB:
        return (), ()
    names = ("<|startoftranscript|>", "<|translate|>", "<|transcribe|>")
    missing = [n for n in names if n not in special]
    if missing:
        raise SfcError(f"the tokenizer lacks Whisper's special tokens {missing}")
    sot, translate, transcribe = (special[n] for n in names)
    languages = sorted((i, t[2:-2]) for t, i in special.items() if sot < i < translate)
    if not languages:
        raise SfcError("the tokenizer has no language tokens after <|startoftranscript|>")
    return (tuple((code, i) for i, code in languages),
            (("transcribe", transcribe), ("translate", translate)))


@dataclass(frozen=True)
class ModelCard:
    """Which graphs a folder holds and how to run them."""

    name: str
    family: str  # "whisper" or "generic"
    graphs: dict[str, GraphSpec]
    objective: str  # the task objective later passes use: "whisper-teacher-forced" or "distortion"
    source: dict[str, str] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None  # LogMelSpec.to_dict() for audio models
    tokenizer: str | None = None
    decoding: WhisperDecoding | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready versioned envelope."""
        return {"_type": "ModelCard", "_version": _VERSION, "_data": asdict(self)}

    def save(self, folder: Path) -> Path:
        """Write `card.json` into `folder` atomically."""
        path = Path(folder) / CARD_NAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, envelope: dict[str, Any]) -> ModelCard:
        """Parse an envelope written by `to_dict`."""
        if envelope.get("_type") != "ModelCard" or envelope.get("_version") != _VERSION:
            raise SfcError(f"not a version-{_VERSION} sfc model card")
        d = dict(envelope["_data"])
        d["graphs"] = {
            k: GraphSpec(
                path=g["path"],
                inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
                             for t in g["inputs"]),
                outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
                              for t in g["outputs"]),
                optimization=g.get("optimization", "all"),
            )
            for k, g in d["graphs"].items()
        }
        if d.get("decoding") is not None:
            dec = dict(d["decoding"])
            for key in ("prompt", "suppress", "suppress_begin"):
                dec[key] = tuple(dec[key])
            for key in ("languages", "tasks"):
                dec[key] = tuple((str(k), int(i)) for k, i in dec.get(key, ()))
            d["decoding"] = WhisperDecoding(**dec)
        return cls(**d)

    @classmethod
    def load(cls, folder: Path) -> ModelCard:
        """Read `card.json` from an export or build folder."""
        path = Path(folder) / CARD_NAME
        if not Path(folder).is_dir():
            raise SfcError(f"{folder} is not a folder; expected an sfc export or build folder")
        if not path.is_file():
            raise SfcError(f"{folder} has no {CARD_NAME}; make one with `sfc export`")
        try:
            card = cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SfcError(f"{path} is not a valid sfc model card ({exc})") from None
        return _with_language_tokens(card, Path(folder))


def _with_language_tokens(card: ModelCard, folder: Path) -> ModelCard:
    """A multilingual card written before cards listed language tokens (cached exports and
    builds of whisper-base), completed from the folder's own tokenizer."""
    dec = card.decoding
    if (dec is None or dec.languages or card.tokenizer is None
            or dec.vocab_size < MULTILINGUAL_VOCAB):
        return card
    languages, tasks = language_tokens(special_tokens(folder / card.tokenizer), dec.vocab_size)
    return replace(card, decoding=replace(dec, languages=languages, tasks=tasks))


def _tensor_specs(values: Any) -> tuple[TensorSpec, ...]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        dims: list[int | str] = [
            d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value")
                                                         else "?")
            for d in t.shape.dim
        ]
        specs.append(TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                                tuple(dims)))
    return tuple(specs)


def graph_spec_from_onnx(model: onnx.ModelProto, path: str) -> GraphSpec:
    """Describe a model's real inputs (initializers excluded) and outputs."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    return GraphSpec(path=path, inputs=_tensor_specs(inputs),
                     outputs=_tensor_specs(model.graph.output))
