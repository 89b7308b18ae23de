"""The exception types users see.

The CLI prints an `SfcError` as a single line and exits non-zero; an `Interrupted` (Ctrl-C
after partial results were saved) prints its message and exits 130; anything else is a
bug and keeps its traceback.
"""


class SfcError(Exception):
    """A user-facing error: bad input, a missing package, an unsupported model."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a long pass after it saved what it had; `str()` says what and where."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): how a
    library's multi-line error becomes part of a one-line `SfcError`."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
