"""sfc: an edge deployment compiler for speech foundation models.

`import sfc` is light: it imports neither torch nor TensorRT. The compile half
(`sfc.models`) imports torch lazily; the runtime half (`sfc.runtime`, `sfc.eval`)
never does, so it runs on an edge device with only numpy and ONNX Runtime.
"""

from . import hf_kernels
from .errors import SfcError

hf_kernels.install()

__all__ = ["SfcError", "__version__"]


def __getattr__(name: str) -> str:
    """`sfc.__version__`, read from the installed metadata: pyproject.toml is the one place
    the version is written. Lazy, so that `import sfc` does not import importlib.metadata."""
    if name == "__version__":
        from importlib.metadata import version

        return version("sfc")
    raise AttributeError(f"module 'sfc' has no attribute {name!r}")
