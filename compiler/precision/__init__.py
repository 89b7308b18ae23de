"""Per-layer weight precision under a budget: candidate formats, the bits each costs,
task-loss sensitivity probes and the integer program that picks one format per weight
(two-stage mixed precision)."""

from .budget import Budget, WeightOption, storage_bits
from .solve import solve_choice

__all__ = ["Budget", "WeightOption", "solve_choice", "storage_bits"]
