"""The Whisper decoder's cross-attention K/V inputs, in either of the two layouts sfc has
exported.

The encoder emits cross_key / cross_value stacked, [layers, batch, heads, frames,
head_dim]. Exports since format 2 take them per layer (`cross_key_0` .. `cross_value_{L-1}`,
each [batch, heads, frames, head_dim]): a stacked decoder input is split into per-layer
copies inside every decoder step, 13-17% of a step on CPU (BENCHMARKS.md, issue 13), while
a per-layer feed is a view of the encoder's output. Folders exported before take the
stacked pair; they still run.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

__all__ = ["STACKED", "cross_feed", "cross_input_names"]

STACKED = ("cross_key", "cross_value")


def cross_input_names(n_layers: int) -> list[str]:
    """The per-layer decoder inputs: every layer's key, then every layer's value."""
    return [f"{kind}_{i}" for kind in STACKED for i in range(n_layers)]


def cross_feed(decoder_inputs: Collection[str], cross_k: np.ndarray,
               cross_v: np.ndarray) -> dict[str, np.ndarray]:
    """The decoder feed of the encoder's stacked `cross_k` / `cross_v` for a decoder whose
    inputs are `decoder_inputs`: per-layer views (no copy), or the stacked pair for a
    decoder exported before per-layer inputs (contiguous: a narrowed batch's rows are a
    view across layers, `whisper.OrtStep`)."""
    if STACKED[0] in decoder_inputs:
        return {STACKED[0]: np.ascontiguousarray(cross_k),
                STACKED[1]: np.ascontiguousarray(cross_v)}
    names = cross_input_names(len(cross_k))
    return dict(zip(names, [*cross_k, *cross_v], strict=True))
