"""Volume work under the widgets and the command line: devices, normalisation, tiled
inference, voxel features (filter bank and encoder levels), and segmentation from
painted labels. Knows numpy, torch and dask;
never Qt or napari.

Several volumes: :func:`finetune_pairs` trains one segmenter on many annotated volumes,
:mod:`.batch` processes many files, and :mod:`.cluster` runs the blocks of a volume on a
Dask distributed cluster (imported on use: it loads ``distributed``).

Every long operation is a generator (``*_job``) that yields :class:`Progress` and returns
its result; :func:`run_job` (and the plain-function forms) drive one to the end.
"""

from .annotations import Annotations
from .classifier import ForestClassifier
from .devices import resolve_device
from .features import extract_features, features_job, pca_rgb, prepare_model
from .jobs import Progress, named_job, run_job
from .normalize import PRESETS, intensity_stats
from .segmenter import (
    Segmenter,
    default_spec,
    finetune,
    finetune_job,
    finetune_pairs,
    finetune_pairs_job,
    load_segmenter,
    save_segmenter,
    segment,
    segment_job,
)
from .voxel_features import FeatureSpec, VolumeFeatures

__all__ = [
    "PRESETS",
    "Annotations",
    "FeatureSpec",
    "ForestClassifier",
    "Progress",
    "Segmenter",
    "VolumeFeatures",
    "default_spec",
    "extract_features",
    "features_job",
    "finetune",
    "finetune_job",
    "finetune_pairs",
    "finetune_pairs_job",
    "intensity_stats",
    "load_segmenter",
    "named_job",
    "pca_rgb",
    "prepare_model",
    "resolve_device",
    "run_job",
    "save_segmenter",
    "segment",
    "segment_job",
]
