"""Turn a plain 2D CNN into its Cross-D variant.

Every ``nn.Conv2d`` with a kernel larger than 1x1 becomes a
:class:`napari_crossd.core.CrossDConv` with the same geometry. 1x1 convolutions stay
``nn.Conv2d`` by default: a 1x1x1 kernel is its own rotation about its centre, so a
Cross-D 1x1 layer computes a plain 1x1 convolution and its rotation head is dead weight.
The official code (``replace_conv_layers`` in github convergedmachine/Cross-D-Conv)
converts them nevertheless, so official checkpoints hold Cross-D shortcut projections
(``layer2.0.downsample.0.weights_3d`` of shape (128, 64, 1, 1, 1) with its own
``rotation_params``); ``pointwise=True`` builds that form to load them.
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


def convert_to_crossd(
    model: nn.Module, rotation: str = "dynamic", rotation_mode: str = "fourier", *, pointwise: bool = False
) -> nn.Module:
    """Replace, in place, every ``nn.Conv2d`` with kernel size > 1 by a :class:`CrossDConv`.

    Args:
        model: any module; existing CrossDConv layers (and their rotation heads) are left
            alone, so a converted model can be converted again with ``pointwise=True``.
        rotation: rotation type of the new layers (see :func:`crossd_from_conv2d`).
        rotation_mode: rotation computation of the new layers.
        pointwise: convert 1x1 convolutions too, as the official code does (the layout of
            official checkpoints; see the module docstring).

    Returns:
        ``model`` itself, for chaining.

    Example:
        >>> from napari_crossd.models.resnet import resnet18
        >>> net = convert_to_crossd(resnet18(), rotation_mode="reference", pointwise=True)
        >>> tuple(net.layer2[0].downsample[0].weights_3d.shape)
        (128, 64, 1, 1, 1)
    """
    for name, child in model.named_children():
        if isinstance(child, CrossDConv):
            continue
        if isinstance(child, nn.Conv2d) and (pointwise or max(child.kernel_size) > 1):
            setattr(model, name, crossd_from_conv2d(child, rotation, rotation_mode))
        else:
            convert_to_crossd(child, rotation, rotation_mode, pointwise=pointwise)
    return model
