"""Quantization core: placement plan, weight quantization, recipe, and the Q/DQ writer.

Flow: `make_plan(fp32_model, PlanConfig(...), caps)` -> calibrate `plan.activations`
(sfc.calib) -> `recipe_from_plan(plan, scales, model_sha256(fp32_model), seed, config)`
-> `write_qdq(fp32_model, recipe)`. No torch.
"""

from .plan import Plan, PlanConfig, Quantizer, Skipped, gather_copy_spec, make_plan, name_nodes
from .qdq import QdqNames, qdq_names, qdq_versions, scale_input_name, write_qdq
from .recipe import Recipe, TensorRecipe, model_sha256, recipe_from_plan
from .spec import (
    INT_RANGES,
    ORT_CPU_CAPS,
    ORT_CPU_SATURATING_CAPS,
    SIM_CAPS,
    TENSORRT_CAPS,
    QuantSpec,
    TargetCaps,
    min_opset,
)
from .weights import (
    broadcast_scales,
    default_method,
    dequantize_weight,
    quantize_weight,
    scale_shape,
    weight_scales,
)

__all__ = [
    "INT_RANGES",
    "ORT_CPU_CAPS",
    "ORT_CPU_SATURATING_CAPS",
    "SIM_CAPS",
    "TENSORRT_CAPS",
    "Plan",
    "PlanConfig",
    "QdqNames",
    "QuantSpec",
    "Quantizer",
    "Recipe",
    "Skipped",
    "TargetCaps",
    "TensorRecipe",
    "broadcast_scales",
    "default_method",
    "dequantize_weight",
    "gather_copy_spec",
    "make_plan",
    "min_opset",
    "model_sha256",
    "name_nodes",
    "qdq_names",
    "qdq_versions",
    "quantize_weight",
    "recipe_from_plan",
    "scale_input_name",
    "scale_shape",
    "weight_scales",
    "write_qdq",
]
