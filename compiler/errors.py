"""The one exception type for user errors.

The CLI prints an `SfcError` as a single line and exits non-zero; anything else is a
bug and keeps its traceback.
"""


class SfcError(Exception):
    """A user-facing error: bad input, a missing package, an unsupported model."""
