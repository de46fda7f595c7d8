"""Architecture registry: names -> constructors, plus the metadata every model carries.

Every model made here gets a ``crossd_meta`` dict attribute that travels with it through
loading, inflation and saving (see :func:`napari_crossd.io.save_model`). Keys set here:

- ``arch``: a name from :data:`ARCHITECTURES`.
- ``format``: parameter layout of the weights: ``"torchvision"`` (plain convolutions),
  ``"crossd"`` (Cross-D layers built by this project) or ``"crossd_official"`` (a
  checkpoint from github.com/convergedmachine/Cross-D-Conv).
- ``num_classes``: width of the classification head.
- ``normalization``: ``{"name", "mean", "std"}`` the weights expect on input.
- ``rotation``, ``rotation_mode``: Cross-D settings (``crossd_*`` architectures only).

Loading (:func:`napari_crossd.io.load_model`) adds ``crossd_pointwise``: True when a
Cross-D ResNet checkpoint converted its 1x1 convolutions too (the official layout; see
:func:`napari_crossd.models.crossd.convert_to_crossd`'s ``pointwise``).

:func:`napari_crossd.models.inflate.inflate` adds ``strategy``, ``official_shift``,
``depth_preserving_stages`` and ``spatial_dims``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .crossd import convert_to_crossd
from .mobilenet import mobilenet_v2
from .resnet import resnet18, resnet34, resnet50

__all__ = [
    "ARCHITECTURES",
    "CROSSD_PREFIX",
    "IMAGENET_NORMALIZATION",
    "RADIMAGENET_NORMALIZATION",
    "build_model",
    "head_name",
    "list_models",
]

CROSSD_PREFIX = "crossd_"

# torchvision's ImageNet statistics (RGB, on images scaled to [0, 1]).
IMAGENET_NORMALIZATION = {
    "name": "imagenet",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# What the official Cross-D evaluation scripts apply to RadImageNet-pretrained weights,
# after min-max scaling each image to [0, 1] (grey values repeated over 3 channels).
RADIMAGENET_NORMALIZATION = {
    "name": "radimagenet",
    "mean": [0.3162, 0.3162, 0.3162],
    "std": [0.3213, 0.3213, 0.3213],
}


@dataclass(frozen=True)
class _Backbone:
    builder: Callable[..., nn.Module]
    head: str  # dotted name of the final nn.Linear; its out_features is num_classes


_BACKBONES = {
    "resnet18": _Backbone(resnet18, "fc"),
    "resnet34": _Backbone(resnet34, "fc"),
    "resnet50": _Backbone(resnet50, "fc"),
    "mobilenet_v2": _Backbone(mobilenet_v2, "classifier.1"),
}

ARCHITECTURES: tuple[str, ...] = (*_BACKBONES, *(CROSSD_PREFIX + name for name in _BACKBONES))


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`: plain backbones first, then Cross-D variants."""
    return list(ARCHITECTURES)


def _backbone(arch: str) -> _Backbone:
    try:
        return _BACKBONES[arch.removeprefix(CROSSD_PREFIX)]
    except KeyError:
        raise ValueError(f"Unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}.") from None


def head_name(arch: str) -> str:
    """Dotted module name of the classification head of ``arch`` (``"fc"``, ``"classifier.1"``)."""
    return _backbone(arch).head


def build_model(
    arch: str,
    num_classes: int = 1000,
    *,
    rotation: str | None = None,
    rotation_mode: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build a randomly initialised network by name.

    Args:
        arch: one of :data:`ARCHITECTURES`, e.g. ``"resnet50"`` or ``"crossd_resnet18"``.
        num_classes: width of the classification head.
        rotation: Cross-D rotation, ``"none"``, ``"static"`` or ``"dynamic"`` (default
            ``"dynamic"``, as in the official checkpoints). ``crossd_*`` only.
        rotation_mode: ``"fourier"`` (default; exact kernel rotation) or ``"reference"``
            (the official computation, needed to reproduce official checkpoints).
            ``crossd_*`` only.
        **kwargs: passed to the backbone constructor (``zero_init_residual`` for ResNets,
            ``dropout`` for MobileNetV2).

    Returns:
        The 2D network in training mode, with a ``crossd_meta`` dict attribute.

    Raises:
        ValueError: unknown ``arch``, or rotation options for a plain architecture.
    """
    spec = _backbone(arch)
    model = spec.builder(num_classes=num_classes, **kwargs)
    meta = {
        "arch": arch,
        "format": "torchvision",
        "num_classes": num_classes,
        "normalization": dict(IMAGENET_NORMALIZATION),
    }
    if arch.startswith(CROSSD_PREFIX):
        meta["rotation"] = rotation or "dynamic"
        meta["rotation_mode"] = rotation_mode or "fourier"
        convert_to_crossd(model, meta["rotation"], meta["rotation_mode"])
        meta["format"] = "crossd"
    elif rotation is not None or rotation_mode is not None:
        raise ValueError(
            f"rotation/rotation_mode apply to Cross-D architectures only; use "
            f"{CROSSD_PREFIX + arch!r} instead of {arch!r}."
        )
    model.crossd_meta = meta
    return model
