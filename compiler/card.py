"""The model card: what a folder of graphs is and how to run it.

Every export or build folder holds `card.json`. The runtime, the evaluator and (later)
the compiler read it to know which graph is which, the preprocessing, the tokens that
drive decoding, and which task objective fits the model. It never imports torch.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import onnx

from .atomic import write_json_atomic
from .errors import SfcError, first_line
from .serial import parse_json, read_json, read_text, unwrap

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
    tok = read_json(tokenizer_json, "tokenizer")
    try:
        return {str(t["content"]): int(t["id"]) for t in tok["added_tokens"]}
    except (KeyError, TypeError, ValueError) as exc:  # a foreign file: malformed entries
        raise SfcError(f"tokenizer {tokenizer_json} has malformed added_tokens "
                       f"({first_line(exc)})") from None


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
    def from_dict(cls, envelope: Any) -> ModelCard:
        """Parse an envelope written by `to_dict`; SfcError names the first field that is
        missing, unknown or of the wrong type, and a file path that leaves the folder."""
        d = _object(unwrap(envelope, "ModelCard", {"ModelCard": _VERSION}, "model card"),
                    "the card", _CARD_FIELDS)
        graphs = d["graphs"]
        if not isinstance(graphs, dict):
            raise SfcError(f"graphs must be an object, not {reprlib.repr(graphs)}")
        source = d.get("source", {})
        if not isinstance(source, dict) or not all(isinstance(v, str) for v in source.values()):
            raise SfcError(f"source must map names to strings, not {reprlib.repr(source)}")
        preprocessing, tokenizer, decoding = (d.get(k) for k in ("preprocessing", "tokenizer",
                                                                 "decoding"))
        if preprocessing is not None and not isinstance(preprocessing, dict):
            raise SfcError(f"preprocessing must be an object, not {reprlib.repr(preprocessing)}")
        return cls(name=_text(d["name"], "name"), family=_text(d["family"], "family"),
                   graphs={k: _graph(g, f"graph {k!r}") for k, g in graphs.items()},
                   objective=_text(d["objective"], "objective"), source=source,
                   preprocessing=preprocessing,
                   tokenizer=None if tokenizer is None else _file(tokenizer, "tokenizer"),
                   decoding=None if decoding is None else _decoding(decoding))

    @classmethod
    def load(cls, folder: Path) -> ModelCard:
        """Read `card.json` from an export or build folder."""
        path = Path(folder) / CARD_NAME
        if not Path(folder).is_dir():
            raise SfcError(f"{folder} is not a folder; expected an sfc export or build folder")
        if not path.is_file():
            raise SfcError(f"{folder} has no {CARD_NAME}; make one with `sfc export`")
        try:
            card = cls.from_dict(parse_json(read_text(path, CARD_NAME), CARD_NAME))
        except SfcError as exc:
            raise SfcError(f"{path} is not a valid sfc model card: {exc}") from None
        return _with_language_tokens(card, Path(folder))


# Which fields a card.json may hold: every dataclass field, those without defaults required.
def _fields(cls: type) -> dict[str, bool]:
    return {f.name: f.default is MISSING and f.default_factory is MISSING for f in fields(cls)}


def _object(value: Any, what: str, known: Mapping[str, bool]) -> dict[str, Any]:
    """`value` as a JSON object holding every required key of `known` and no other keys."""
    if not isinstance(value, dict):
        raise SfcError(f"{what} must be an object, not {reprlib.repr(value)}")
    missing = sorted(k for k, required in known.items() if required and k not in value)
    unknown = sorted(map(repr, set(value) - set(known)))  # user text: quoted, one line
    if missing or unknown:
        raise SfcError(f"{what}: " + "; ".join(
            f"{label} {', '.join(keys)}" for label, keys in (("missing", missing),
                                                             ("unknown", unknown)) if keys))
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise SfcError(f"{what} must be a string, not {reprlib.repr(value)}")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SfcError(f"{what} must be an integer, not {reprlib.repr(value)}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise SfcError(f"{what} must be a list, not {reprlib.repr(value)}")
    return value


def _file(value: Any, what: str) -> str:
    """A file named relative to the card's folder that stays inside it (no absolute path,
    no `..`), so a card cannot make sfc read or run a file elsewhere."""
    path = _text(value, what)
    pure = PureWindowsPath(path)  # reads both separators and drive letters
    if (not path.strip() or "\0" in path or pure.is_absolute() or pure.drive
            or PurePosixPath(path).is_absolute() or ".." in pure.parts):
        raise SfcError(f"{what} must be a file inside the card's folder, not {path!r}")
    return path


def _tensor(value: Any, what: str) -> TensorSpec:
    t = _object(value, what, _fields(TensorSpec))
    shape = tuple(d if isinstance(d, str) else _int(d, f"{what} dimension")
                  for d in _list(t["shape"], f"{what} shape"))
    return TensorSpec(_text(t["name"], f"{what} name"), _text(t["dtype"], f"{what} dtype"), shape)


def _graph(value: Any, what: str) -> GraphSpec:
    g = _object(value, what, _fields(GraphSpec))
    return GraphSpec(
        path=_file(g["path"], f"{what} path"),
        inputs=tuple(_tensor(t, f"{what} input") for t in _list(g["inputs"], f"{what} inputs")),
        outputs=tuple(_tensor(t, f"{what} output")
                      for t in _list(g["outputs"], f"{what} outputs")),
        optimization=_text(g.get("optimization", "all"), f"{what} optimization"),
    )


def _ids(value: Any, what: str) -> tuple[int, ...]:
    return tuple(_int(i, what) for i in _list(value, what))


def _tokens(value: Any, what: str) -> Tokens:
    pairs = [_list(p, what) for p in _list(value, what)]
    if any(len(p) != 2 for p in pairs):
        raise SfcError(f"{what} must hold [name, token id] pairs")
    return tuple((_text(n, what), _int(i, what)) for n, i in pairs)


# WhisperDecoding's field types (as `from __future__ import annotations` writes them).
_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "int": _int, "tuple[int, ...]": _ids, "Tokens": _tokens}
_CARD_FIELDS = _fields(ModelCard)


def _decoding(value: Any) -> WhisperDecoding:
    d = _object(value, "decoding", _fields(WhisperDecoding))
    return WhisperDecoding(**{f.name: _PARSERS[str(f.type)](d[f.name], f"decoding {f.name}")
                              for f in fields(WhisperDecoding) if f.name in d})


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
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        except KeyError:  # a sequence, map or optional, or a type ONNX does not define
            raise SfcError(f"graph input or output {v.name!r} is not a tensor of a known "
                           f"element type (type {t.elem_type}); sfc runs tensors only") from None
        specs.append(TensorSpec(v.name, dtype, tuple(dims)))
    return tuple(specs)


def graph_spec_from_onnx(model: onnx.ModelProto, path: str) -> GraphSpec:
    """Describe a model's real inputs (initializers excluded) and outputs."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    return GraphSpec(path=path, inputs=_tensor_specs(inputs),
                     outputs=_tensor_specs(model.graph.output))
