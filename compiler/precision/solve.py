"""The integer program of two-stage mixed precision: one option per weight, least total
sensitivity, total bits within the budget (scipy's HiGHS MILP, exact)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import SfcError
from .budget import WeightOption

__all__ = ["fill_budget", "solve_choice"]


def solve_choice(options: Mapping[str, Sequence[WeightOption]],
                 bits_allowed: float) -> dict[str, int]:
    """weight -> index of its chosen option, minimising the summed sensitivity subject to
    sum(bits) <= bits_allowed. Deterministic: ties go to the fewer-bits solution HiGHS
    returns for the same input. SfcError when even the cheapest options exceed the budget.
    """
    names = list(options)
    if not names:
        raise SfcError("no quantizable weight to choose bit-widths for")
    if any(not options[n] for n in names):
        raise SfcError("every weight needs at least one option")
    floor = sum(min(o.bits for o in options[n]) for n in names)
    if floor > bits_allowed:
        raise SfcError(f"the budget ({bits_allowed / 8e6:.3f} MB of weights) is below the "
                       f"smallest choice ({floor / 8e6:.3f} MB): raise it")
    flat = [(i, o) for i, n in enumerate(names) for o in options[n]]
    bits = np.array([o.bits for _, o in flat], dtype=np.float64)
    sens = np.array([o.sensitivity for _, o in flat], dtype=np.float64)
    # A tiny bits term breaks ties towards smaller weights without outweighing any real
    # sensitivity difference (scaled below the smallest nonzero gap).
    gaps = np.abs(np.diff(np.unique(sens)))
    eps = (gaps.min() if gaps.size else 1.0) * 1e-3 / max(bits.sum(), 1.0)
    one_each = np.zeros((len(names), len(flat)))
    for j, (i, _) in enumerate(flat):
        one_each[i, j] = 1.0
    result = milp(
        c=sens + eps * bits,
        constraints=[LinearConstraint(one_each, 1, 1),
                     LinearConstraint(bits[None, :], -np.inf, bits_allowed)],
        integrality=np.ones(len(flat)),
        bounds=Bounds(0, 1),
        options={"presolve": True, "mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise SfcError(f"the bit-width program found no solution ({result.message})")
    chosen = np.rint(result.x).astype(int)
    out: dict[str, int] = {}
    start = 0
    for n in names:
        k = len(options[n])
        picked = np.flatnonzero(chosen[start:start + k])
        assert picked.size == 1
        out[n] = int(picked[0])
        start += k
    used = sum(options[n][out[n]].bits for n in names)
    if used > bits_allowed:  # HiGHS tolerances: never hand back an over-budget choice
        raise SfcError("the bit-width program returned a choice over the budget")
    return out


def fill_budget(options: Mapping[str, Sequence[WeightOption]], chosen: Mapping[str, int],
                bits_allowed: float) -> dict[str, int]:
    """`chosen` with the bits it leaves unspent given away: repeatedly, the upgrade (a
    weight to an option with more bits that still fits) with the least added cost per
    added bit, until none fits. Deterministic (ties go to the first weight in order)."""
    out = dict(chosen)
    spare = bits_allowed - sum(options[n][i].bits for n, i in out.items())
    while True:
        best: tuple[float, str, int] | None = None
        for n, i in out.items():
            here = options[n][i]
            for j, o in enumerate(options[n]):
                extra = o.bits - here.bits
                if 0 < extra <= spare:
                    rate = (o.sensitivity - here.sensitivity) / extra
                    if best is None or rate < best[0]:
                        best = (rate, n, j)
        if best is None:
            return out
        _, n, j = best
        spare -= options[n][j].bits - options[n][out[n]].bits
        out[n] = j
