"""What a portability check reports: `Finding`s gathered in a `CheckReport`.

A finding is one fact about one node (or the model, `MODEL_NODE`) that decides whether the
file loads and builds on the target: an `error` means the runtime rejects it (or, for
ONNX Runtime's INT2 fusion, computes wrong results), a `warning` that it may (or that the
fact is unconfirmed), `info` a requirement to meet at build or run time.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ..atomic import write_json_atomic
from ..errors import SfcError
from ..serial import read_json, unwrap

__all__ = ["MODEL_NODE", "SEVERITIES", "CheckReport", "Finding", "Severity"]

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")
MODEL_NODE = "(model)"  # the node of findings about the whole file (versions, opsets)

_KNOWN_TYPES = {"CheckReport": 1}


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Finding:
    """One rule's verdict on one node: what is wrong, and how to fix it (empty for info)."""

    severity: Severity
    rule: str
    node: str
    message: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise SfcError(f"finding severity must be error, warning or info, "
                           f"not {self.severity!r}")
        if not self.rule or not self.message:
            raise SfcError("a finding needs a rule id and a message")

    def line(self) -> str:
        """`error  <rule>  <node>: <message> (fix: ...)`, the CLI's one line per finding
        (control characters in names from the model escaped, as `\\n`)."""
        fix = f" (fix: {self.fix})" if self.fix else ""
        return _printable(f"{self.severity}  {self.rule}  {self.node}: {self.message}{fix}")

    @classmethod
    def from_data(cls, d: Any) -> Finding:
        """Inverse of `dataclasses.asdict`."""
        return cls(severity=d["severity"], rule=str(d["rule"]), node=str(d["node"]),
                   message=str(d["message"]), fix=str(d.get("fix", "")))


@dataclass(frozen=True)
class CheckReport:
    """Every finding of one check of `model` against `target` (a profile name).

    `arch` is the compute capability the check assumed ("sm_87"), None where the
    profile has none (ONNX Runtime CPU, or a TensorRT profile with no default device).
    """

    model: str
    target: str
    arch: str | None
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> tuple[Finding, ...]:
        """Findings of severity error."""
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def passed(self) -> bool:
        """True when no finding is an error (warnings and info do not fail a check)."""
        return not self.errors

    def counts(self) -> dict[str, int]:
        """Findings per severity, every severity present (zeros included)."""
        found = Counter(f.severity for f in self.findings)
        return {s: found.get(s, 0) for s in SEVERITIES}

    def by_rule(self) -> dict[str, int]:
        """Findings per rule id, most frequent first (ties by rule id)."""
        found = Counter(f.rule for f in self.findings)
        return dict(sorted(found.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        """One line: verdict, counts per severity, counts per rule."""
        c = self.counts()
        where = f"{self.target} ({self.arch})" if self.arch else self.target
        verdict = "passes" if self.passed else "fails"
        rules = ", ".join(f"{r} {n}" for r, n in self.by_rule().items()) or "none"
        return (f"{self.model} {verdict} {where}: {c['error']} errors, {c['warning']} warnings, "
                f"{c['info']} info; by rule: {rules}")

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON-ready envelope (findings in report order)."""
        data = {"model": self.model, "target": self.target, "arch": self.arch,
                "passed": self.passed, "counts": self.counts(), "by_rule": self.by_rule(),
                "findings": [asdict(f) for f in self.findings]}
        return {"_type": "CheckReport", "_version": _KNOWN_TYPES["CheckReport"], "_data": data}

    def to_json(self) -> str:
        """`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, obj: Any) -> CheckReport:
        """Rebuild a report from `to_dict`'s envelope; SfcError on malformed input."""
        d = unwrap(obj, "CheckReport", _KNOWN_TYPES, "check report")
        try:
            return cls(model=str(d["model"]), target=str(d["target"]),
                       arch=None if d["arch"] is None else str(d["arch"]),
                       findings=tuple(Finding.from_data(f) for f in d["findings"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise SfcError(f"malformed CheckReport: {exc!r}") from None

    def save(self, path: str | Path) -> None:
        """Write the report as JSON to `path` atomically."""
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CheckReport:
        """Read a report written by `save`."""
        return cls.from_dict(read_json(path, "check report"))
