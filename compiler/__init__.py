"""sfc: an edge deployment compiler for speech foundation models.

`import sfc` is light: it imports neither torch nor TensorRT. The compile half
(`sfc.models`) imports torch lazily; the runtime half (`sfc.runtime`, `sfc.eval`)
never does, so it runs on an edge device with only numpy and ONNX Runtime.
"""

from .errors import SfcError

__all__ = ["SfcError", "__version__"]
__version__ = "0.1.0"
