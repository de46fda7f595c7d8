"""Ship pretrained weights: a compact copy of a run's ``model.safetensors`` for ``resources/``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from napari_crossd.io import load_model, save_model

__all__ = ["export_weights"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export_weights(src: str | Path, dest: str | Path, dtype: str = "float16") -> list[Path]:
    """Re-save weights written by ``crossd pretrain`` with floating-point tensors in ``dtype``.

    float16 halves the file (a Cross-D MobileNetV2 goes from 10 MB to 5 MB, under the 10 MB
    that ``resources/`` allows); :func:`napari_crossd.load_model` casts the values back
    into the float32 network on load. The metadata (architecture, Cross-D settings,
    class names, input normalisation, training summary) is kept, with ``stored_dtype``
    added so the rounding is on record.

    Args:
        src: a ``model.safetensors`` from ``crossd pretrain`` (or anything ``save_model`` wrote).
        dest: the ``.safetensors`` path to write (a ``.json`` sidecar goes beside it).
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.

    Returns:
        The paths written.

    Raises:
        ValueError: unknown ``dtype``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
    model = load_model(src)
    # Only the floating-point tensors: BatchNorm's num_batches_tracked stays an integer.
    model.to(_DTYPES[dtype])
    model.crossd_meta = replace(model.crossd_meta, stored_dtype=dtype)
    return save_model(model, dest)
