"""napari-crossd: 2D-pretrained CNNs on 3D volumes with Cross-D Conv, in napari and from Python."""

from .core import CrossDConv, rotate_kernels

__version__ = "0.1.0"

__all__ = ["CrossDConv", "rotate_kernels"]
