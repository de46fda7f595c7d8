"""Architecture registry: names -> constructors, plus the metadata every model carries.

Every model made here gets a :class:`~napari_crossd.models.meta.ModelMeta` as its
``crossd_meta`` attribute, which travels with it through loading, inflation and saving (see
:func:`napari_crossd.io.save_model`): here its ``arch``, ``format``, ``num_classes``,
``normalization`` and, for Cross-D architectures, ``rotation`` and ``rotation_mode``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from .crossd import convert_to_crossd
from .meta import ModelMeta, Normalization
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
IMAGENET_NORMALIZATION = Normalization("imagenet", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# What the official Cross-D evaluation scripts apply to RadImageNet-pretrained weights,
# after min-max scaling each image to [0, 1] (grey values repeated over 3 channels).
RADIMAGENET_NORMALIZATION = Normalization("radimagenet", mean=(0.3162,) * 3, std=(0.3213,) * 3)


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
        The 2D network in training mode, with its ``crossd_meta``.

    Raises:
        ValueError: unknown ``arch``, or rotation options for a plain architecture.
    """
    spec = _backbone(arch)
    model = spec.builder(num_classes=num_classes, **kwargs)
    meta = ModelMeta(arch, num_classes=num_classes, normalization=IMAGENET_NORMALIZATION)
    if arch.startswith(CROSSD_PREFIX):
        meta = replace(meta, format="crossd", rotation=rotation or "dynamic", rotation_mode=rotation_mode or "fourier")
        convert_to_crossd(model, meta.rotation, meta.rotation_mode)
    elif rotation is not None or rotation_mode is not None:
        raise ValueError(
            f"rotation/rotation_mode apply to Cross-D architectures only; use "
            f"{CROSSD_PREFIX + arch!r} instead of {arch!r}."
        )
    model.crossd_meta = meta
    return model
