"""2D pretraining of Cross-D (or plain) backbones: data sets and a torchrun/DDP training loop.

``crossd pretrain`` (and ``torchrun ... -m napari_crossd.cli pretrain``) runs
:func:`pretrain`; see :mod:`napari_crossd.training.loop` for outputs and exact resume.
"""

from .data import FashionMNIST, ImageFolder, VolumeSlices, open_dataset, read_idx
from .loop import PretrainConfig, add_pretrain_arguments, evaluate, load_checkpoint, pretrain, run_pretrain
from .release import export_weights

__all__ = [
    "FashionMNIST",
    "ImageFolder",
    "PretrainConfig",
    "VolumeSlices",
    "add_pretrain_arguments",
    "evaluate",
    "export_weights",
    "load_checkpoint",
    "open_dataset",
    "pretrain",
    "read_idx",
    "run_pretrain",
]
