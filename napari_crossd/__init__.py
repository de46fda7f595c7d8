"""napari-crossd: 2D-pretrained CNNs on 3D volumes with Cross-D Conv, in napari and from Python.

The public names are imported on first use (:mod:`napari_crossd._lazy`): importing the
package, as napari does to open a NIfTI file, does not import torch.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "CrossDConv": ".core",
    "build_model": ".models",
    "inflate": ".models.inflate",
    "load_model": ".io",
    "rotate_kernels": ".core",
    "save_model": ".io",
}
__all__ = ["CrossDConv", "build_model", "inflate", "load_model", "rotate_kernels", "save_model"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what editors and type checkers resolve the lazy names to
    from .core import CrossDConv, rotate_kernels
    from .io import load_model, save_model
    from .models import build_model
    from .models.inflate import inflate
