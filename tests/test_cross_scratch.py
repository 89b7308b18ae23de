"""A batch's cross K/V stacked chunk by chunk, into new arrays or reused scratch buffers."""

from __future__ import annotations

import numpy as np

from sfc.runtime.whisper import CrossScratch, encode_in_chunks

LAYERS, HEADS, FRAMES, DIM = 2, 3, 5, 4


def fake_run(windows: np.ndarray) -> list[np.ndarray]:
    """K and V [layers, b, heads, frames, dim] that depend on each window's values."""
    base = windows[:, 0, 0].astype(np.float32)  # one number per window
    k = np.broadcast_to(base[None, :, None, None, None],
                        (LAYERS, len(windows), HEADS, FRAMES, DIM)).copy()
    k += np.arange(LAYERS, dtype=np.float32)[:, None, None, None, None]
    return [k, -k]


def windows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3),
                                                                                np.float32)


def test_scratch_gives_the_same_values_as_new_arrays() -> None:
    w = windows(5)
    k_new, v_new = encode_in_chunks(fake_run, w, 1)
    k, v = encode_in_chunks(fake_run, w, 1, CrossScratch())
    np.testing.assert_array_equal(k, k_new)
    np.testing.assert_array_equal(v, v_new)
    np.testing.assert_array_equal(k_new, fake_run(w)[0])  # chunks in order, on axis 1


def test_scratch_is_reused_across_batches_up_to_its_rows() -> None:
    scratch = CrossScratch(rows=8)
    k1, _ = encode_in_chunks(fake_run, windows(2), 1, scratch)
    k2, v2 = encode_in_chunks(fake_run, windows(7, start=10), 1, scratch)
    assert np.shares_memory(k1, k2)  # sized for 8 windows at the first batch
    np.testing.assert_array_equal(k2, fake_run(windows(7, start=10))[0])
    np.testing.assert_array_equal(v2, -k2)
    k3, _ = encode_in_chunks(fake_run, windows(9), 1, scratch)  # more than it holds
    assert not np.shares_memory(k3, k2)
    np.testing.assert_array_equal(k3, fake_run(windows(9))[0])


def test_one_chunk_returns_the_encoder_outputs_themselves() -> None:
    outputs = fake_run(windows(3))
    k, v = encode_in_chunks(lambda _: outputs, windows(3), None, CrossScratch())
    assert k is outputs[0] and v is outputs[1]
