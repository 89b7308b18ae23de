"""benchmarks/resolve_mix.py: a finished search's program solved again with formats
forbidden, written as a graph-qualified precision map the build applies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sfc.precision.mapfile import load_precision
from sfc.quant.plan import entries_for_graph
from tests.conftest import bench_module


@pytest.fixture(scope="module")
def rm() -> Any:
    return bench_module("resolve_mix")


def _layer(graph: str, tensor: str, node: str, s8: float, s4: float, s2: float
           ) -> dict[str, Any]:
    return {"graph": graph, "tensor": tensor, "consumers": [node], "chosen": "2/32",
            "options": [{"label": "8", "bits": 800, "sensitivity": s8},
                        {"label": "4/32", "bits": 500, "sensitivity": s4},
                        {"label": "2/32", "bits": 300, "sensitivity": s2}]}


def test_forbidden_formats_are_never_chosen_and_the_map_is_per_graph(rm: Any,
                                                                      tmp_path: Any) -> None:
    # Same node name in both graphs; the decoder's 2-bit option is the cheapest loss.
    found = {"bits_allowed": 800, "layers": [
        _layer("decoder", "d", "/k_proj/MatMul", 0.0, 0.5, 1.0),
        _layer("encoder", "e", "/k_proj/MatMul", 0.0, 0.5, 4.0)]}
    free, loss = rm.resolve(found, [])
    assert free == {"decoder:d": "2/32", "encoder:e": "4/32"} and loss == 1.5
    ruled, loss = rm.resolve(found, [("decoder:*", "2/32")])
    assert ruled == {"decoder:d": "4/32", "encoder:e": "2/32"} and loss == 4.5
    path = tmp_path / "map.json"
    path.write_text(json.dumps(rm.as_map(found, ruled)))
    entries = load_precision(path)
    dec, enc = entries_for_graph(entries, "decoder"), entries_for_graph(entries, "encoder")
    assert [(e.pattern, e.weights, e.block_size) for e in dec] == [("/k_proj/MatMul", 4, 32)]
    assert [(e.pattern, e.weights, e.block_size) for e in enc] == [("/k_proj/MatMul", 2, 32)]
    with pytest.raises(SystemExit, match="every format is forbidden"):
        rm.resolve(found, [("*", "8"), ("*", "4/32"), ("*", "2/32")])
