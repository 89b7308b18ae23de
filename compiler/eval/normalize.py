"""Text normalisation before scoring, so WER counts words rather than formatting.

Uses Whisper's English normaliser: case, punctuation, spelling variants and spoken
numbers ("twenty five dollars" -> "$25") are made uniform on both sides.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


@functools.cache
def _normalizer() -> Callable[[str], str]:
    # Built once: construction loads the bundled spelling table (english.json).
    from whisper_normalizer.english import EnglishTextNormalizer

    normalizer: Callable[[str], str] = EnglishTextNormalizer()
    return normalizer


def normalize_text(text: str) -> str:
    """Normalise English text the way Whisper's evaluation does."""
    return _normalizer()(text)
