"""The contract every fuzz target holds, shared by the atheris harnesses and the hypothesis
tests (`tests/test_fuzz_properties.py`).

Any input ends in a correct result or a one-line `SfcError`: any other exception is a
failure, and so is a write outside the output folder (and its staging folder beside it,
see `_may_write`) or a read of a file in the sandbox
outside the folders the loader may read (an audit hook enforces both while a target runs).
Each `*_target` function writes its input into a `Sandbox`, runs the loader under that
guard, and checks what a successful load returned.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sfc.card import CARD_NAME, ModelCard
from sfc.check import PROFILES, CheckReport, check_model
from sfc.errors import SfcError
from sfc.models.onnx_source import MODEL_FILE, export_onnx_file
from sfc.quant import Recipe
from sfc.runtime.audio import load_audio

T = TypeVar("T")

# The bytes beside every fuzzed ONNX file as `weights.bin`: its external data seeds point
# into it. `secret.bin` / `secret.json`, one folder up, are decoys no loader may read.
EXTERNAL_DATA = np.arange(64, dtype=np.float32).tobytes()
EXTERNAL_FILE = "weights.bin"
# A tokenizer.json whose special tokens make a multilingual card loadable (ids as in
# Whisper's multilingual vocabulary: two languages between <|startoftranscript|> and
# <|translate|>).
TOKENIZER = {"added_tokens": [
    {"id": 50257, "content": "<|endoftext|>"}, {"id": 50258, "content": "<|startoftranscript|>"},
    {"id": 50259, "content": "<|en|>"}, {"id": 50260, "content": "<|de|>"},
    {"id": 50358, "content": "<|translate|>"}, {"id": 50359, "content": "<|transcribe|>"},
]}
DECOY = "secret"


class Escape(AssertionError):
    """A loader touched a file outside the folders it may write or read."""


@dataclass(frozen=True)
class _Rule:
    root: Path
    writable: Path
    readable: tuple[Path, ...]


_ACTIVE: list[_Rule] = []
_HOOKED = False
# Audit events that change the file system: where their paths are among the arguments,
# and where the directory descriptor each path may be relative to is.
_WRITE_EVENTS = {"os.rename": ((0, 2), (1, 3)), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),),
                 "os.mkdir": ((0, 2),), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
                 "os.truncate": ((0, None),), "os.chmod": ((0, 2),), "os.utime": ((0, 3),),
                 "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),),
                 "shutil.move": ((0, None), (1, None))}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _resolved(path: object, dir_fd: object = None) -> Path | None:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str | os.PathLike):
        return None  # a file descriptor: its open was audited already
    if isinstance(dir_fd, int) and not os.path.isabs(path):
        try:
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        except OSError:  # no /proc (macOS): where the descriptor points is unknown
            return None
    return Path(os.path.realpath(os.path.abspath(path)))


def _may_write(rule: _Rule, target: Path) -> bool:
    """Inside the output folder, or inside its staging folder beside it
    (`.<name>.stage-<pid>-<random>`: sfc.atomic publishes a folder in one swap from there
    and removes it on exit)."""
    if target.is_relative_to(rule.writable):
        return True
    parent = rule.writable.parent
    return target.is_relative_to(parent) and target != parent and target.relative_to(
        parent).parts[0].startswith(f".{rule.writable.name}.stage-")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _ACTIVE:
        return
    rule = _ACTIVE[-1]
    if event == "open":
        path, mode, flags = args
        target = _resolved(path)
        if target is None:
            return
        writes = (mode is not None and any(c in mode for c in "wax+")) or (
            flags is not None and flags & _WRITE_FLAGS)
        if writes and not _may_write(rule, target):
            raise Escape(f"wrote {target} outside {rule.writable}")
        # The output's parent folder itself may be opened: sfc.atomic locks it to publish.
        if (not writes and target.is_relative_to(rule.root)
                and target != rule.writable.parent
                and not any(target.is_relative_to(r) for r in rule.readable)):
            raise Escape(f"read {target}, outside {[str(r) for r in rule.readable]}")
    elif event in _WRITE_EVENTS:
        for at, fd_at in _WRITE_EVENTS[event]:
            target = _resolved(args[at], None if fd_at is None else args[fd_at])
            if target is not None and not _may_write(rule, target):
                raise Escape(f"{event} on {target} outside {rule.writable}")


@contextlib.contextmanager
def confined(root: Path, writable: Path, readable: tuple[Path, ...] = ()) -> Iterator[None]:
    """Within the block: writes outside `writable`, and reads of files under `root` outside
    `writable` and `readable`, raise `Escape` (Python-level file access, via audit hooks)."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)  # hooks cannot be removed: it is idle outside `confined`
        _HOOKED = True
    rule = _Rule(root.resolve(), writable.resolve(),
                 (writable.resolve(), *(r.resolve() for r in readable)))
    _ACTIVE.append(rule)
    try:
        yield
    finally:
        _ACTIVE.pop()


def one_line(fn: Callable[..., T], *args: Any) -> T | None:
    """`fn(*args)`, or None when it raised an SfcError whose message is one non-empty line;
    any other exception propagates (the fuzzers' failure)."""
    try:
        return fn(*args)
    except SfcError as exc:
        message = str(exc)
        if not message.strip() or "\n" in message or "\r" in message:
            raise AssertionError(f"SfcError is not one line: {message!r}") from exc
        return None


class Sandbox:
    """A scratch folder: `src/` holds the input, `out/` is the only writable place, and
    decoys lie in the root, outside both."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"
        self.out = root / "out"

    @classmethod
    @contextlib.contextmanager
    def temporary(cls) -> Iterator[Sandbox]:
        """A fresh sandbox per input, removed afterwards (libFuzzer exits without running
        Python's atexit handlers, so nothing may outlive one input)."""
        root = Path(tempfile.mkdtemp(prefix="sfc-fuzz-"))
        try:
            box = cls(root)
            box.src.mkdir()
            (root / f"{DECOY}.bin").write_bytes(EXTERNAL_DATA)
            (root / f"{DECOY}.json").write_text(json.dumps(TOKENIZER))
            yield box
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def confined(self) -> contextlib.AbstractContextManager[None]:
        return confined(self.root, self.out, (self.src,))


# --- audio -----------------------------------------------------------------------------

class _Stdin(io.TextIOWrapper):
    """Bytes standing in for a pipe on standard input."""

    def isatty(self) -> bool:
        return False


def audio_target(data: bytes) -> np.ndarray | None:
    """Load `data` as an audio file and as piped standard input: both give the same
    samples (float32 mono, finite, within [-1, 1]) or both a one-line SfcError."""
    with Sandbox.temporary() as box:
        path = box.src / "input.wav"
        path.write_bytes(data)
        with box.confined():
            from_file = one_line(load_audio, path)
        saved, sys.stdin = sys.stdin, _Stdin(io.BytesIO(data))
        try:
            with box.confined():
                from_pipe = one_line(load_audio, "-")
        finally:
            sys.stdin = saved
    assert (from_file is None) == (from_pipe is None), "file and stdin disagree"
    if from_file is not None and from_pipe is not None:
        assert from_file.dtype == np.float32 and from_file.ndim == 1 and from_file.size > 0
        assert np.all(np.isfinite(from_file)) and float(np.max(np.abs(from_file))) <= 1.0
        np.testing.assert_array_equal(from_file, from_pipe)
    return from_file


# --- recipe.json -------------------------------------------------------------------------

def _finite_positive(value: object) -> bool:
    return (isinstance(value, float | int) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def recipe_target(data: bytes) -> Recipe | None:
    """Load `data` as recipe.json: a loaded recipe has the declared field types, finite
    positive activation scales, and survives a save / load round trip unchanged."""
    with Sandbox.temporary() as box:
        path = box.src / "recipe.json"
        path.write_bytes(data)
        with box.confined():
            recipe = one_line(Recipe.load, path)
        if recipe is None:
            return None
        assert isinstance(recipe.seed, int) and isinstance(recipe.config, dict)
        for t in recipe.tensors:
            assert all(isinstance(v, str) for v in (t.tensor, t.kind, t.method, t.note))
            assert isinstance(t.consumers, tuple) and isinstance(t.stats, dict)
            assert t.kind == "weight" or _finite_positive(t.scale)
        with box.confined():
            recipe.save(box.out / "recipe.json")
            assert Recipe.load(box.out / "recipe.json") == recipe
    return recipe


# --- card.json ---------------------------------------------------------------------------

def _inside(folder: Path, relative: object) -> bool:
    return isinstance(relative, str) and (folder / relative).resolve().is_relative_to(
        folder.resolve())


def _check_card(card: ModelCard, folder: Path) -> None:
    """The declared field types, and files named inside `folder` only."""
    assert all(isinstance(v, str) for v in (card.name, card.family, card.objective))
    assert isinstance(card.source, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in card.source.items())
    assert card.preprocessing is None or isinstance(card.preprocessing, dict)
    assert card.tokenizer is None or _inside(folder, card.tokenizer)
    assert isinstance(card.graphs, dict)
    for key, graph in card.graphs.items():
        assert isinstance(key, str) and _inside(folder, graph.path)
        assert isinstance(graph.optimization, str)
        for spec in (*graph.inputs, *graph.outputs):
            assert isinstance(spec.name, str) and isinstance(spec.dtype, str)
            assert all(isinstance(d, str | int) and not isinstance(d, bool) for d in spec.shape)
    dec = card.decoding
    if dec is not None:
        ints = (dec.eot, dec.timestamp_begin, dec.max_target_positions, dec.n_layers,
                dec.n_heads, dec.head_dim, dec.vocab_size, *dec.prompt, *dec.suppress,
                *dec.suppress_begin, *(i for _, i in (*dec.languages, *dec.tasks)))
        assert all(isinstance(i, int) and not isinstance(i, bool) for i in ints)
        assert all(isinstance(n, str) for n, _ in (*dec.languages, *dec.tasks))


def card_target(data: bytes) -> ModelCard | None:
    """Load `data` as card.json in a folder that also holds a tokenizer.json: a loaded card
    has the declared field types, names files inside its folder only, and survives a save /
    load round trip unchanged."""
    with Sandbox.temporary() as box:
        (box.src / CARD_NAME).write_bytes(data)
        (box.src / "tokenizer.json").write_text(json.dumps(TOKENIZER))
        with box.confined():
            card = one_line(ModelCard.load, box.src)
        if card is None:
            return None
        _check_card(card, box.src)
        with box.confined():
            card.save(box.out)
            (box.out / "tokenizer.json").write_text(json.dumps(TOKENIZER))
            assert ModelCard.load(box.out) == card
    return card


# --- ONNX source and `sfc check` ---------------------------------------------------------

def onnx_target(data: bytes) -> ModelCard | None:
    """Export `data` as an ONNX source into `out/`, and check it against every profile:
    an exported folder holds model.onnx and a card that loads; a check report survives its
    JSON round trip and prints one line per finding."""
    with Sandbox.temporary() as box:
        path = box.src / MODEL_FILE
        path.write_bytes(data)
        (box.src / EXTERNAL_FILE).write_bytes(EXTERNAL_DATA)
        with box.confined():
            card = one_line(export_onnx_file, path, box.out)
        if card is not None:
            assert (box.out / MODEL_FILE).is_file()
            with box.confined():
                assert ModelCard.load(box.out) == card
        for target in PROFILES:
            with box.confined():
                report = one_line(check_model, path, target)
            if report is not None:
                assert CheckReport.from_dict(json.loads(report.to_json())) == report
                assert all("\n" not in f.line() for f in report.findings)
    return card
