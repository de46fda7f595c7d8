"""Turn a plain 2D CNN into its Cross-D variant.

Every ``nn.Conv2d`` with a kernel larger than 1x1 becomes a
:class:`napari_crossd.core.CrossDConv` with the same geometry. 1x1 convolutions stay
``nn.Conv2d``: a 1x1x1 kernel has nothing to rotate, and the official Cross-D ResNet-18
checkpoints keep them that way (``layerN.0.downsample.0.weight``).
"""

from __future__ import annotations

from torch import nn

from napari_crossd.core import CrossDConv

__all__ = ["convert_to_crossd", "crossd_from_conv2d"]


def crossd_from_conv2d(conv: nn.Conv2d, rotation: str = "dynamic", rotation_mode: str = "fourier") -> CrossDConv:
    """A freshly initialised :class:`CrossDConv` with the geometry of ``conv``.

    The 2D weights are *not* copied: how a 2D kernel should fill a 3D one is an
    inflation strategy (see :func:`napari_crossd.models.inflate.inflate`).

    Args:
        conv: the 2D convolution to mirror; its kernel must be square (the 3D kernel is a
            cube), and depth takes the height's stride, padding and dilation.
        rotation: ``"none"``, ``"static"`` or ``"dynamic"`` (see :class:`CrossDConv`).
        rotation_mode: ``"fourier"`` (exact rotation) or ``"reference"`` (the official
            implementation's computation, for official checkpoints).

    Returns:
        A CrossDConv on the same device and with the same dtype as ``conv``.
    """
    return CrossDConv(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        rotation=rotation,
        rotation_mode=rotation_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


def convert_to_crossd(model: nn.Module, rotation: str = "dynamic", rotation_mode: str = "fourier") -> nn.Module:
    """Replace, in place, every ``nn.Conv2d`` with kernel size > 1 by a :class:`CrossDConv`.

    Args:
        model: any module; existing CrossDConv layers are left alone.
        rotation: rotation type of the new layers (see :func:`crossd_from_conv2d`).
        rotation_mode: rotation computation of the new layers.

    Returns:
        ``model`` itself, for chaining.
    """
    for name, child in model.named_children():
        if isinstance(child, CrossDConv):
            continue
        if isinstance(child, nn.Conv2d) and max(child.kernel_size) > 1:
            setattr(model, name, crossd_from_conv2d(child, rotation, rotation_mode))
        else:
            convert_to_crossd(child, rotation, rotation_mode)
    return model
