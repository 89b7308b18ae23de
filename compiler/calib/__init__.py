"""Calibration: streamed activation statistics, and methods that turn them into scales.

`collect_stats` runs the FP32 model once over the calibration feeds on ONNX Runtime (CPU)
and keeps, per requested tensor, only bounded statistics (`StatsSnapshot`: count, min, max,
absmax and a fixed-size |x| histogram). `compute_scale(stats, method, bits)` then applies a
calibration method (`MaxCalib`, `PercentileCalib`, `EntropyCalib`, `MseCalib`) to give a
signed symmetric `CalibResult`.

ESC (`EscCalib`, `esc_search`) is the global method: MSE start scales refined jointly over
all graphs of a model by CMA-ES against a task objective (`calib.objectives`).
"""

from .esc import EscCalib, EscResult, esc_search, quantizer_key, start_scales
from .methods import (
    MIN_SCALE,
    CalibMethod,
    CalibResult,
    EntropyCalib,
    MaxCalib,
    MseCalib,
    PercentileCalib,
    compute_scale,
    compute_scales,
    method_from_dict,
    method_from_name,
    method_names,
    register,
)
from .stats import DEFAULT_BINS, StatsSnapshot, TensorStats, collect_stats

__all__ = [
    "DEFAULT_BINS",
    "MIN_SCALE",
    "CalibMethod",
    "CalibResult",
    "EntropyCalib",
    "EscCalib",
    "EscResult",
    "MaxCalib",
    "MseCalib",
    "PercentileCalib",
    "StatsSnapshot",
    "TensorStats",
    "collect_stats",
    "compute_scale",
    "compute_scales",
    "esc_search",
    "method_from_dict",
    "method_from_name",
    "method_names",
    "quantizer_key",
    "register",
    "start_scales",
]
