"""Evaluation results: per-utterance scores, their summary, JSON storage and display.

Results are stored as a versioned envelope ``{"_type", "_version", "_data"}``; loading
accepts only known types and versions, so a stale or foreign file fails loudly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from ..atomic import write_json_atomic
from ..errors import SfcError
from ..serial import read_text, unwrap
from .wer import bootstrap_ci, corpus_wer

RESULT_TYPE = "EvalResult"
RESULT_VERSION = 2  # 2: per-utterance loop_stops
# Every type this module can load, with the one version it understands.
_KNOWN_TYPES: Mapping[str, int] = {RESULT_TYPE: RESULT_VERSION}


@dataclass(frozen=True)
class UtteranceResult:
    """One utterance's transcript, error counts and timing."""

    id: str
    voice: str
    condition: str
    reference: str
    hypothesis: str
    substitutions: int
    deletions: int
    insertions: int
    ref_words: int
    audio_s: float
    compute_s: float
    loop_stops: int = 0  # windows whose decoding the repetition-loop guard ended

    @property
    def errors(self) -> int:
        """Total word errors of this utterance."""
        return self.substitutions + self.deletions + self.insertions


@dataclass(frozen=True)
class GroupStats:
    """Corpus WER of a group of utterances with its bootstrap interval."""

    n: int
    wer: float
    ci_lo: float
    ci_hi: float
    ref_words: int


@dataclass(frozen=True)
class EvalResult:
    """A model's evaluation on a data set: WER with CI, speed, and breakdowns."""

    model: str
    data: str
    n: int
    wer: float
    ci_lo: float
    ci_hi: float
    rtf: float
    audio_s: float
    compute_s: float
    per_voice: dict[str, GroupStats]
    per_condition: dict[str, GroupStats]
    utterances: tuple[UtteranceResult, ...]
    seed: int
    n_resamples: int
    # Utterances transcribed together (throughput mode): the compute seconds are their
    # batch's, split by audio length. Absent from results saved before it: 1.
    batch: int = 1

    @property
    def loop_stops(self) -> int:
        """Windows, over all utterances, whose decoding the repetition-loop guard ended."""
        return sum(u.loop_stops for u in self.utterances)

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON-ready envelope of this result."""
        return {"_type": RESULT_TYPE, "_version": RESULT_VERSION, "_data": asdict(self)}

    def to_json(self) -> str:
        """Serialise to a JSON string (a versioned envelope)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, envelope: Any) -> EvalResult:
        """Rebuild a result from its envelope; SfcError on unknown or malformed input."""
        data = unwrap(envelope, RESULT_TYPE, _KNOWN_TYPES, "result")
        try:
            return cls(
                model=str(data["model"]),
                data=str(data["data"]),
                n=int(data["n"]),
                wer=float(data["wer"]),
                ci_lo=float(data["ci_lo"]),
                ci_hi=float(data["ci_hi"]),
                rtf=float(data["rtf"]),
                audio_s=float(data["audio_s"]),
                compute_s=float(data["compute_s"]),
                per_voice=_groups(data["per_voice"]),
                per_condition=_groups(data["per_condition"]),
                utterances=tuple(UtteranceResult(**u) for u in data["utterances"]),
                seed=int(data["seed"]),
                n_resamples=int(data["n_resamples"]),
                batch=int(data.get("batch", 1)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SfcError(f"malformed {RESULT_TYPE}: {exc!r}") from exc

    @classmethod
    def from_json(cls, text: str) -> EvalResult:
        """Parse a result from a JSON string written by `to_json`."""
        try:
            envelope = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SfcError(f"invalid result JSON: {exc}") from exc
        return cls.from_dict(envelope)

    def save(self, path: str | Path) -> None:
        """Write the result to `path` atomically (never a half-written file)."""
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read a result written by `save`."""
        text = read_text(path, "result file")
        return cls.from_json(text)


def _groups(raw: Mapping[str, Any]) -> dict[str, GroupStats]:
    return {
        str(k): GroupStats(
            n=int(v["n"]),
            wer=float(v["wer"]),
            ci_lo=float(v["ci_lo"]),
            ci_hi=float(v["ci_hi"]),
            ref_words=int(v["ref_words"]),
        )
        for k, v in raw.items()
    }


def _group_stats(utts: Sequence[UtteranceResult], *, seed: int, n_resamples: int) -> GroupStats:
    errors = [u.errors for u in utts]
    ref_words = [u.ref_words for u in utts]
    lo, hi = bootstrap_ci(errors, ref_words, n_resamples=n_resamples, seed=seed)
    return GroupStats(
        n=len(utts), wer=corpus_wer(utts), ci_lo=lo, ci_hi=hi, ref_words=sum(ref_words)
    )


def _breakdown(
    utts: Sequence[UtteranceResult],
    key: Callable[[UtteranceResult], str],
    *,
    seed: int,
    n_resamples: int,
) -> dict[str, GroupStats]:
    groups: dict[str, list[UtteranceResult]] = {}
    for u in utts:
        groups.setdefault(key(u), []).append(u)
    # Sorted keys keep saved results and tables stable across runs.
    return {
        name: _group_stats(groups[name], seed=seed, n_resamples=n_resamples)
        for name in sorted(groups)
    }


def summarize(
    model: str,
    data: str,
    utterances: Iterable[UtteranceResult],
    *,
    seed: int,
    n_resamples: int,
    batch: int = 1,
) -> EvalResult:
    """Aggregate per-utterance results into corpus WER, CI, RTF and breakdowns.

    RTF is total transcription time over total audio time (below 1 is faster than
    real time). Every voice and condition group gets its own bootstrap interval. `batch`:
    the utterances transcribed together, recorded.
    """
    utts = tuple(utterances)
    if not utts:
        raise SfcError("no utterances to summarize")
    overall = _group_stats(utts, seed=seed, n_resamples=n_resamples)
    audio_s = float(sum(u.audio_s for u in utts))
    compute_s = float(sum(u.compute_s for u in utts))
    return EvalResult(
        model=model,
        data=data,
        n=overall.n,
        wer=overall.wer,
        ci_lo=overall.ci_lo,
        ci_hi=overall.ci_hi,
        rtf=compute_s / audio_s if audio_s > 0 else math.inf,
        audio_s=audio_s,
        compute_s=compute_s,
        per_voice=_breakdown(utts, lambda u: u.voice, seed=seed, n_resamples=n_resamples),
        per_condition=_breakdown(utts, lambda u: u.condition, seed=seed, n_resamples=n_resamples),
        utterances=utts,
        seed=seed,
        n_resamples=n_resamples,
        batch=batch,
    )


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}%"


def render(result: EvalResult) -> Table:
    """A rich table: overall WER with its 95% CI and RTF, then per condition and voice."""
    table = Table(
        title=Text(  # the data path is user data: never read as markup
            f"{result.model} on {result.data}: WER {_pct(result.wer)} "
            f"(95% CI [{_pct(result.ci_lo)}, {_pct(result.ci_hi)}]), RTF {result.rtf:.3f}"
        ),
        caption=(
            f"{result.n} utterances, {result.audio_s:.1f} s audio, "
            f"{result.compute_s:.1f} s compute; bootstrap {result.n_resamples} resamples, "
            f"seed {result.seed}; repetition loops stopped: {result.loop_stops}"
            + (f"; decoded in batches of {result.batch}" if result.batch > 1 else "")
        ),
    )
    table.add_column("group")
    table.add_column("n", justify="right")
    table.add_column("words", justify="right")
    table.add_column("WER", justify="right")
    table.add_column("95% CI", justify="right")

    total_ref = sum(u.ref_words for u in result.utterances)
    table.add_row(
        "overall",
        str(result.n),
        str(total_ref),
        _pct(result.wer),
        f"[{_pct(result.ci_lo)}, {_pct(result.ci_hi)}]",
        end_section=True,
    )
    for label, groups in (("condition", result.per_condition), ("voice", result.per_voice)):
        names = list(groups)
        for i, name in enumerate(names):
            g = groups[name]
            table.add_row(
                Text(f"{label}={name}"),  # manifest names are user data
                str(g.n),
                str(g.ref_words),
                _pct(g.wer),
                f"[{_pct(g.ci_lo)}, {_pct(g.ci_hi)}]",
                end_section=i == len(names) - 1,
            )
    return table
