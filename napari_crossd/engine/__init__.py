"""Volume work under the widgets and the command line: devices, normalisation, tiled
inference, features, and segmentation from painted labels. Knows numpy, torch and dask;
never Qt or napari.

Every long operation is a generator (``*_job``) that yields :class:`Progress` and returns
its result; :func:`run_job` (and the plain-function forms) drive one to the end.
"""

from .devices import resolve_device
from .features import extract_features, features_job, pca_rgb, prepare_model
from .jobs import Progress, run_job
from .normalize import PRESETS, intensity_stats
from .segmenter import Segmenter, finetune, finetune_job, load_segmenter, save_segmenter, segment, segment_job

__all__ = [
    "PRESETS",
    "Progress",
    "Segmenter",
    "extract_features",
    "features_job",
    "finetune",
    "finetune_job",
    "intensity_stats",
    "load_segmenter",
    "pca_rgb",
    "prepare_model",
    "resolve_device",
    "run_job",
    "save_segmenter",
    "segment",
    "segment_job",
]
