"""Static portability checks of QDQ ONNX files against a runtime version (`sfc check`).

`check_model("model.qdq.onnx", "tensorrt:10.3")` returns a `CheckReport` of `Finding`s
(error / warning / info, rule id, node, message, fix) from the rules in `rules.RULES`,
which read the facts of one `Profile` (`profiles.PROFILES`: tensorrt:10.3, tensorrt:10.16,
tensorrt:11, ort-cpu). Nothing is built or run, so it works without TensorRT or a GPU.
"""

from .findings import MODEL_NODE, CheckReport, Finding
from .profiles import PROFILES, Profile, resolve_profile
from .rules import RULES, Rule
from .runner import check_model

__all__ = [
    "MODEL_NODE",
    "PROFILES",
    "RULES",
    "CheckReport",
    "Finding",
    "Profile",
    "Rule",
    "check_model",
    "resolve_profile",
]
