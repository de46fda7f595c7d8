"""napari-crossd: 2D-pretrained CNNs on 3D volumes with Cross-D Conv, in napari and from Python."""

from .core import CrossDConv, rotate_kernels
from .io import load_model, save_model
from .models import build_model
from .models.inflate import inflate

__version__ = "0.1.0"

__all__ = ["CrossDConv", "build_model", "inflate", "load_model", "rotate_kernels", "save_model"]
