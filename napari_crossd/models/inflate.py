"""Inflate any 2D network to 3D: each 2D layer becomes its 3D counterpart, weights carried over.

Convention:
    3D tensors are (B, C, D, H, W): axes (d, h, w) with depth first, as ``nn.Conv3d``.
    A 2D layer's (h, w) geometry is kept in-plane and its depth entry copies the h entry
    (kernel extent, stride, padding, dilation, output padding, pooling window), except in
    depth-preserving layers (``depth_preserving_stages``), which get depth extent 1,
    stride 1 and padding 0. A 2D kernel W is (C_out, C_in / groups, k_h, k_w) and its
    inflated kernel U is (C_out, C_in / groups, k_d, k_h, k_w); ``c = k // 2`` is the
    central index (the convention of :mod:`napari_crossd.core` for even k too).

Strategies (for every plain 2D kernel; a layer with k_d = 1 gets U = W whatever the strategy):

* ``centre``: ``U[:, :, c] = W``, zeros elsewhere. Each output slice is the 2D layer applied
  to the matching input slice; with depth stride 1 a whole network is the 2D network run
  slice by slice.
* ``i3d`` (Carreira & Zisserman, 2017): ``U[:, :, z] = W / k`` for every z. A volume
  constant along depth gives the 2D output at every depth (exactly with replicate
  padding, away from the first and last slices with zero padding). A transposed
  convolution spreads each input over k / s output slices, so its U is ``W * s / k``
  (s its depth stride): exact when s divides k.
* ``acs`` (Yang et al., ACS convolutions, 2021): the output channels are split in three
  contiguous groups as ``acsconv`` splits them (``C_out // 3`` each, the remainder going to
  the axial group first, then to the coronal one) and W is laid in one plane of the cube:
  axial ``U[o, :, c, :, :] = W[o]`` (the (h, w) plane), coronal ``U[o, :, :, c, :] = W[o]``
  (W's rows along d, columns along w) and sagittal ``U[o, :, :, :, c] = W[o]`` (rows along
  d, columns along h): ``acsconv``'s ``weight.unsqueeze(2 | 3 | 4)``. Written as one plain
  Conv3d kernel, which equals ``acsconv.ACSConv`` whenever padding = dilation * (k - 1) / 2
  (every layer of ResNet, MobileNetV2 and VGG). Square kernels only.
* ``crossd``: W laid in the central plane (the ``centre`` kernel) and tilted about the h
  axis and about the w axis by +-30, +-60 and +-90 degrees with
  :func:`napari_crossd.core.rotation_operator` (exact Fourier rotations; +-90 degrees are
  exact quarter turns, i.e. ACS's coronal and sagittal placements); U is the mean of the
  twelve tilted kernels with its central slice then reset to W exactly. U responds to
  W's pattern on planes tilted out of the slice, its central slice is the pretrained
  kernel (what a Cross-D layer's 2D forward sees at zero angle), and it is symmetric under
  ``d -> -d``. Square kernels only.

Cross-D layers (:class:`napari_crossd.core.CrossDConv`) become the Conv3d that the layer
itself applies to 3D input: the learned U (rotated by its static rotation, if it has one),
the rotation network dropped as the official evaluation does, whatever the strategy. For
``rotation_mode="reference"`` (official checkpoints) the 2D network saw
``roll(U, (1, 1, 1))[:, :, c]`` at zero angle: ``official_shift="keep"`` uses U as it is
(the official 3D pipeline), ``"undo"`` uses ``roll(U, (1, 1, 1), dims=(d, h, w))`` so that
its central slice is the 2D kernel the network was trained with.

Only modules are converted. Spatial work done by functions in a ``forward``
(``F.conv2d``, ``F.interpolate``, ``x.mean((2, 3))``) is invisible here; the backbones of
this package do all of it with modules. GroupNorm and InstanceNorm take their statistics
over the whole volume in 3D, so a network with them is not the 2D network slice by slice
even under ``centre``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from napari_crossd.core import CrossDConv, rotation_operator, static_kernels

from .meta import ModelMeta, model_meta

__all__ = ["OFFICIAL_SHIFTS", "STRATEGIES", "inflate"]

STRATEGIES = ("centre", "i3d", "acs", "crossd")
OFFICIAL_SHIFTS = ("keep", "undo")

# Tilts of the ``crossd`` strategy, applied about h and about w, each with both signs.
_CROSSD_TILTS = (math.pi / 6, math.pi / 3, math.pi / 2)
# Side of the square probe image that measures each layer's stage: 2**7 survives seven
# stride-2 downsamplings without rounding (backbones here have five) and costs little.
_PROBE_SIZE = 128
# 2D layers that cannot be written as a 3D module (checked after the converters).
_UNCONVERTIBLE = (
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Fold,
    nn.Unfold,
    nn.FractionalMaxPool2d,
    nn.CrossMapLRN2d,
)
_UPSAMPLE_MODES = {"nearest": "nearest", "nearest-exact": "nearest-exact", "bilinear": "trilinear", "area": "area"}


def inflate(
    model: nn.Module,
    strategy: str = "i3d",
    *,
    official_shift: str = "keep",
    depth_preserving_stages: int = 0,
) -> nn.Module:
    """Return a 3D copy of ``model``: every 2D layer replaced by its 3D counterpart.

    ``Conv2d`` -> ``Conv3d`` (kernel by ``strategy``, see the module docstring),
    ``ConvTranspose2d`` -> ``ConvTranspose3d``, ``CrossDConv`` -> ``Conv3d`` with its learned
    3D kernel, ``BatchNorm2d``/``InstanceNorm2d`` -> 3D with their statistics, max/avg/LP
    pooling and unpooling -> 3D, adaptive pooling to ``(s, s)`` -> ``(s, s, s)`` (None stays
    None), ``Upsample`` (bilinear -> trilinear), ``Dropout2d`` -> ``Dropout3d``,
    ``Softmax2d`` -> softmax over channels, 2D padding layers -> 3D (depth padded as h).
    ``GroupNorm``, channel-only ``LayerNorm``, activations, ``Linear``, containers and other
    layers without spatial meaning are kept as they are. Groups, stride, dilation, padding
    (int, tuple, ``"same"``, ``"valid"``), padding mode, bias, ``requires_grad`` and
    train/eval mode carry over; modules shared in ``model`` stay shared.

    Args:
        model: a 2D network, or a single layer. It is deep-copied and left untouched.
        strategy: how a plain 2D kernel becomes 3D: one of :data:`STRATEGIES`.
        official_shift: for Cross-D layers with ``rotation_mode="reference"``: ``"keep"``
            their 3D kernel as the official pipeline does, or ``"undo"`` the official
            one-voxel roll (see the module docstring). One of :data:`OFFICIAL_SHIFTS`.
        depth_preserving_stages: N >= 0. For anisotropic or thick-slice volumes: layers
            in the first N stages keep depth extent 1, depth stride 1 and depth padding 0,
            so the depth of the volume is kept through them. A layer's stage is the number
            of factor-2 downsamplings between the network input and the finer of its input
            and output: conv1 and maxpool of a ResNet are in stages 0 and 1, layer1 and
            layer2's strided entry (shortcut included) in stage 2; the upsampling that
            returns to stage s in a decoder is in stage s. Feature maps at stages 0..N
            therefore keep the input depth. Measured with hooks on one forward pass of a
            (1, C, 128, 128) zero image (eval mode, no grad); a head that fails on that size
            after the last spatial layer is fine. Adaptive pooling is never depth-preserving
            (its output size is what the head expects).

    Returns:
        The 3D network, in the train/eval mode of ``model``. Its ``crossd_meta`` (a copy of
        ``model``'s, or one with ``arch=None`` if it has none) records ``strategy``,
        ``official_shift``, ``depth_preserving_stages`` and ``spatial_dims=3``.

    Raises:
        ValueError: an unknown option, or a layer with spatial meaning that cannot be
            converted (its module path and type are named).

    Example:
        >>> net2d = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        >>> inflate(net2d, "centre")(torch.zeros(1, 1, 5, 16, 16)).shape
        torch.Size([1, 4, 5, 16, 16])
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if official_shift not in OFFICIAL_SHIFTS:
        raise ValueError(f"official_shift must be one of {OFFICIAL_SHIFTS}; got {official_shift!r}")
    if isinstance(depth_preserving_stages, bool) or not isinstance(depth_preserving_stages, int):
        raise ValueError(f"depth_preserving_stages must be an int >= 0; got {depth_preserving_stages!r}")
    if depth_preserving_stages < 0:
        raise ValueError(f"depth_preserving_stages must be >= 0; got {depth_preserving_stages}")
    meta = model_meta(model)
    if not isinstance(meta, ModelMeta):
        raise ValueError(f"model.crossd_meta must be a ModelMeta; got {type(meta).__name__}")

    copied = copy.deepcopy(model)
    flat = _depth_preserving_layers(copied, depth_preserving_stages)
    inflated = _Inflater(strategy, official_shift, flat).convert(copied, "")
    inflated.crossd_meta = replace(meta, strategy=strategy, official_shift=official_shift,
                                   depth_preserving_stages=depth_preserving_stages, spatial_dims=3)
    return inflated


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _with_depth(value, flat: bool, flat_value):
    """An int or (h, w) setting as (d, h, w): depth copies h, or is ``flat_value`` when flat.

    Strings (``"same"``, ``"valid"``) and None mean the same in 3D and pass unchanged.
    """
    if value is None or isinstance(value, str):
        return value
    h, w = _pair(value)
    return (flat_value if flat else h, h, w)


def _acs_split(channels: int) -> tuple[int, int, int]:
    """Axial, coronal and sagittal group sizes, as ``acsconv.ACSConv`` splits them."""
    base, remainder = divmod(channels, 3)
    return tuple(base + (i < remainder) for i in range(3))


def _acs_planes(channels: int) -> torch.Tensor:
    """(channels,) plane of each output channel: 0 axial, 1 coronal, 2 sagittal."""
    return torch.repeat_interleave(torch.arange(3), torch.tensor(_acs_split(channels)))


@functools.cache
def _tilt_operator(size: int) -> torch.Tensor:
    """(size^3, size^2) float64 map from W to the mean of its tilted centre-plane embeddings."""
    angles = [sign * tilt for tilt in _CROSSD_TILTS for sign in (1.0, -1.0)]
    rotvecs = torch.zeros(2 * len(angles), 3, dtype=torch.float64)
    rotvecs[: len(angles), 1] = torch.tensor(angles)  # about h: tilts the plane towards d along w
    rotvecs[len(angles) :, 2] = torch.tensor(angles)  # about w: tilts it towards d along h
    operator = rotation_operator(rotvecs, size, dtype=torch.float64).mean(dim=0)
    # W only fills the central plane d = c, so only those columns of the operator matter.
    return operator.reshape(size**3, size, size, size)[:, size // 2].reshape(size**3, size**2)


def _inflate_kernel(
    weight: torch.Tensor,
    strategy: str,
    depth: int,
    planes: torch.Tensor | None = None,
    i3d_gain: float = 1.0,
) -> torch.Tensor:
    """A 2D kernel bank (A, B, k_h, k_w) as a 3D one (A, B, depth, k_h, k_w).

    Args:
        weight: the 2D kernels.
        strategy: one of :data:`STRATEGIES`.
        depth: k_d; 1 gives ``W`` itself whatever the strategy.
        planes: (A, B) integers in {0, 1, 2} (axial, coronal, sagittal) for ``acs``.
        i3d_gain: multiplies the ``i3d`` kernel (s / k for transposed convolutions).
    """
    if depth == 1:
        return weight.unsqueeze(2)
    centre = depth // 2
    if strategy == "i3d":
        return weight.unsqueeze(2).expand(-1, -1, depth, -1, -1) * i3d_gain / depth
    if strategy == "centre":
        kernel = weight.new_zeros(*weight.shape[:2], depth, *weight.shape[2:])
        kernel[:, :, centre] = weight
        return kernel
    if strategy == "acs":
        axial, coronal, sagittal = (weight.new_zeros(*weight.shape[:2], depth, depth, depth) for _ in range(3))
        axial[:, :, centre] = weight
        coronal[:, :, :, centre] = weight
        sagittal[:, :, :, :, centre] = weight
        planes = planes[..., None, None, None]
        return torch.where(planes == 0, axial, torch.where(planes == 1, coronal, sagittal))
    operator = _tilt_operator(depth).to(device=weight.device)
    kernel = (weight.flatten(2).to(torch.float64) @ operator.T).to(weight.dtype)
    kernel = kernel.reshape(*weight.shape[:2], depth, depth, depth)
    kernel[:, :, centre] = weight
    return kernel


def _depth_preserving_layers(model: nn.Module, stages: int) -> set[int]:
    """ids of the layers in the first ``stages`` stages (see :func:`inflate`)."""
    if stages == 0:
        return set()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _GEOMETRY_TYPES)}
    first_conv = next((m for m in layers.values() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))), None)
    if first_conv is None:
        raise ValueError("depth_preserving_stages needs a convolution to size the probe image; found none")
    probe = first_conv.weight.new_zeros(1, first_conv.in_channels, _PROBE_SIZE, _PROBE_SIZE)

    levels: dict[int, int] = {}

    def record(module, args, output):
        output = output[0] if isinstance(output, tuple) else output  # pools with return_indices
        finest = max(math.prod(t.shape[-2:]) for t in (args[0], output))
        level = round(0.5 * math.log2(_PROBE_SIZE**2 / max(finest, 1)))
        # A layer shared between stages is depth-preserving if any of its uses is.
        levels[id(module)] = min(level, levels.get(id(module), level))

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(record) for m in layers.values()]
    failure = None
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    except Exception as error:  # a head built for another input size may fail after the layers
        failure = error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    unseen = [name or "<root>" for name, m in layers.items() if id(m) not in levels]
    if failure is not None and unseen:
        raise ValueError(
            f"depth_preserving_stages: the probe forward pass on a {tuple(probe.shape)} zero image "
            f"failed before reaching {unseen[0]!r}: {failure}"
        ) from failure
    # Layers never called (unused) stay fully 3D.
    return {id(m) for m in layers.values() if levels.get(id(m), stages) < stages}


@dataclass
class _Inflater:
    """Walks a module tree and converts its layers; ``flat`` holds depth-preserving layer ids."""

    strategy: str
    official_shift: str
    flat: set[int]

    def __post_init__(self) -> None:
        # id(old) -> (old, new): keeps shared modules shared and the old ones alive (ids unique).
        self.memo: dict[int, tuple[nn.Module, nn.Module]] = {}

    def convert(self, module: nn.Module, path: str) -> nn.Module:
        if id(module) in self.memo:
            return self.memo[id(module)][1]
        new = self._layer(module, path)
        if new is None:
            # _modules, not named_children(), which skips the second name of a shared child.
            for name, child in list(module._modules.items()):
                if child is not None:
                    setattr(module, name, self.convert(child, f"{path}.{name}" if path else name))
            new = module
        elif new is not module:
            new.train(module.training)
        self.memo[id(module)] = (module, new)
        return new

    def _layer(self, module: nn.Module, path: str) -> nn.Module | None:
        """The 3D replacement of a layer, the layer itself if it works in 3D, None for containers."""
        where = f"{path or '<root>'} ({type(module).__qualname__})"
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"cannot inflate {where}: run a forward pass to initialise the lazy layer")
        for base, converter in _CONVERTERS:
            if isinstance(module, base):
                if type(module).forward is not base.forward:
                    raise ValueError(
                        f"cannot inflate {where}: a subclass of {base.__name__} with its own forward; "
                        "its 3D behaviour is unknown"
                    )
                return converter(self, module, where)
        is_leaf = next(module.children(), None) is None
        if isinstance(module, _UNCONVERTIBLE) or (is_leaf and type(module).__name__.lower().endswith("2d")):
            raise ValueError(f"cannot inflate {where}: no 3D counterpart is known for this 2D layer")
        return None

    def _is_flat(self, module: nn.Module) -> bool:
        return id(module) in self.flat

    def _kernel(self, module, where: str, planes: torch.Tensor, depth: int, i3d_gain: float = 1.0) -> torch.Tensor:
        weight = module.weight.detach()
        square = weight.shape[-1] == weight.shape[-2]
        if depth > 1 and self.strategy in ("acs", "crossd") and not square:
            raise ValueError(
                f"cannot inflate {where} with strategy {self.strategy!r}: it needs a square kernel, "
                f"got {tuple(weight.shape[-2:])}; use 'centre' or 'i3d'"
            )
        if depth > 1 and self.strategy == "crossd" and depth % 2 == 0:
            raise ValueError(
                f"cannot inflate {where} with strategy 'crossd': it needs an odd kernel to rotate "
                f"about its centre, got {tuple(weight.shape[-2:])}; use 'centre', 'i3d' or 'acs'"
            )
        return _inflate_kernel(weight, self.strategy, depth, planes, i3d_gain)

    def _conv3d_arguments(self, m: nn.Conv2d | nn.ConvTranspose2d) -> tuple[bool, int, dict]:
        """Whether ``m`` stays flat in depth, its k_d, and the arguments its 3D layer shares with it."""
        flat = self._is_flat(m)
        depth = 1 if flat else m.kernel_size[0]
        arguments = {
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "kernel_size": (depth, *m.kernel_size),
            "stride": _with_depth(m.stride, flat, 1),
            "padding": _with_depth(m.padding, flat, 0),
            "dilation": _with_depth(m.dilation, flat, 1),
            "groups": m.groups,
            "bias": m.bias is not None,
            "padding_mode": m.padding_mode,
            "device": m.weight.device,
            "dtype": m.weight.dtype,
        }
        return flat, depth, arguments

    def _conv(self, m: nn.Conv2d, where: str) -> nn.Conv3d:
        _, depth, arguments = self._conv3d_arguments(m)
        conv = nn.Conv3d(**arguments)
        kernel = self._kernel(m, where, _acs_planes(m.out_channels).to(m.weight.device)[:, None], depth)
        return _with_weights(conv, kernel, m.weight, m.bias)

    def _conv_transpose(self, m: nn.ConvTranspose2d, where: str) -> nn.ConvTranspose3d:
        flat, depth, arguments = self._conv3d_arguments(m)
        conv = nn.ConvTranspose3d(**arguments, output_padding=_with_depth(m.output_padding, flat, 0))
        # The weight is (C_in, C_out / groups, ...): entry (i, j) feeds output channel
        # (i // (C_in / groups)) * (C_out / groups) + j.
        in_per_group, out_per_group = m.in_channels // m.groups, m.out_channels // m.groups
        rows = torch.arange(m.in_channels)[:, None] // in_per_group * out_per_group
        channel = rows + torch.arange(out_per_group)[None, :]
        planes = _acs_planes(m.out_channels)[channel]
        kernel = self._kernel(m, where, planes.to(m.weight.device), depth, i3d_gain=conv.stride[0])
        return _with_weights(conv, kernel, m.weight, m.bias)

    def _crossd_conv(self, m: CrossDConv, where: str) -> nn.Conv3d:
        k = m.kernel_size[0]
        size = m.kernel_support or k
        if (size - k) % 2:
            raise ValueError(
                f"cannot inflate {where}: kernel_size {k} padded to kernel_support {size} "
                "is padded unevenly, which nn.Conv3d cannot express"
            )
        weights = m.weights_3d.detach()
        if m.rotation_mode == "reference" and self.official_shift == "undo":
            weights = torch.roll(weights, (1, 1, 1), dims=(-3, -2, -1))
        rotation = m.rotation_vector.detach() if m.rotation == "static" else None
        weights = static_kernels(weights, rotation, support=m.kernel_support)
        # The support grows the kernel symmetrically; the padding grows with it (as CrossDConv does).
        extra = (size - k) // 2
        padding = m.padding_3d
        if padding != "same":
            base = (0, 0, 0) if padding == "valid" else padding
            padding = tuple(p + extra * d for p, d in zip(base, m.dilation_3d, strict=True))
        stride, dilation = m.stride_3d, m.dilation_3d
        if self._is_flat(m):
            weights = weights[:, :, size // 2 : size // 2 + 1]
            stride, dilation = (1, *stride[1:]), (1, *dilation[1:])
            padding = padding if padding == "same" else (0, *padding[1:])
        conv = nn.Conv3d(
            m.in_channels,
            m.out_channels,
            tuple(weights.shape[-3:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=m.groups,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
            device=weights.device,
            dtype=weights.dtype,
        )
        return _with_weights(conv, weights, m.weights_3d, m.bias)

    def _batch_norm(self, m: nn.BatchNorm2d, where: str) -> nn.BatchNorm3d:
        norm = nn.BatchNorm3d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **_factory(m))
        return _with_state(norm, m)

    def _instance_norm(self, m: nn.InstanceNorm2d, where: str) -> nn.InstanceNorm3d:
        norm = nn.InstanceNorm3d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **_factory(m))
        return _with_state(norm, m)

    def _max_pool(self, m: nn.MaxPool2d, where: str) -> nn.MaxPool3d:
        flat = self._is_flat(m)
        return nn.MaxPool3d(
            _with_depth(m.kernel_size, flat, 1),
            _with_depth(m.stride, flat, 1),
            _with_depth(m.padding, flat, 0),
            _with_depth(m.dilation, flat, 1),
            m.return_indices,
            m.ceil_mode,
        )

    def _avg_pool(self, m: nn.AvgPool2d, where: str) -> nn.AvgPool3d:
        flat = self._is_flat(m)
        kernel = _with_depth(m.kernel_size, flat, 1)
        divisor = m.divisor_override
        if divisor is not None:
            divisor *= kernel[0]  # the window gains k_d voxels: keep it an average over the same share
        return nn.AvgPool3d(
            kernel,
            _with_depth(m.stride, flat, 1),
            _with_depth(m.padding, flat, 0),
            m.ceil_mode,
            m.count_include_pad,
            divisor,
        )

    def _lp_pool(self, m: nn.LPPool2d, where: str) -> nn.LPPool3d:
        flat = self._is_flat(m)
        return nn.LPPool3d(
            m.norm_type, _with_depth(m.kernel_size, flat, 1), _with_depth(m.stride, flat, 1), m.ceil_mode
        )

    def _max_unpool(self, m: nn.MaxUnpool2d, where: str) -> nn.MaxUnpool3d:
        flat = self._is_flat(m)
        return nn.MaxUnpool3d(
            _with_depth(m.kernel_size, flat, 1), _with_depth(m.stride, flat, 1), _with_depth(m.padding, flat, 0)
        )

    def _adaptive_pool(self, m: nn.Module, where: str) -> nn.Module:
        pool = nn.AdaptiveMaxPool3d if isinstance(m, nn.AdaptiveMaxPool2d) else nn.AdaptiveAvgPool3d
        output_size = m.output_size if isinstance(m.output_size, int) else _with_depth(m.output_size, False, 1)
        if isinstance(m, nn.AdaptiveMaxPool2d):
            return pool(output_size, m.return_indices)
        return pool(output_size)

    def _upsample(self, m: nn.Upsample, where: str) -> nn.Upsample:
        flat = self._is_flat(m)
        if m.mode not in _UPSAMPLE_MODES:
            raise ValueError(
                f"cannot inflate {where}: mode {m.mode!r} has no 3D counterpart (supported: {tuple(_UPSAMPLE_MODES)})"
            )
        size, scale = m.size, m.scale_factor
        if size is not None and (flat or not isinstance(size, int)):
            raise ValueError(
                f"cannot inflate {where}: a fixed output size {size!r} says nothing about depth; use scale_factor"
            )
        if scale is not None and (flat or isinstance(scale, tuple)):
            scale = _with_depth(scale, flat, 1.0)
        return nn.Upsample(
            size=size,
            scale_factor=scale,
            mode=_UPSAMPLE_MODES[m.mode],
            align_corners=m.align_corners,
            recompute_scale_factor=m.recompute_scale_factor,
        )

    def _dropout(self, m: nn.Dropout2d, where: str) -> nn.Dropout3d:
        return nn.Dropout3d(m.p, m.inplace)

    def _softmax(self, m: nn.Softmax2d, where: str) -> nn.Softmax:
        return nn.Softmax(dim=-4)  # the channel axis of (C, D, H, W) and (B, C, D, H, W)

    def _pad(self, m: nn.Module, where: str) -> nn.Module:
        left, right, top, bottom = m.padding
        padding = (left, right, top, bottom) + ((0, 0) if self._is_flat(m) else (top, bottom))
        if isinstance(m, nn.ZeroPad2d):
            return nn.ZeroPad3d(padding)
        if isinstance(m, nn.ConstantPad2d):
            return nn.ConstantPad3d(padding, m.value)
        return _PADS[type(m)](padding)

    def _layer_norm(self, m: nn.LayerNorm, where: str) -> nn.LayerNorm:
        if len(m.normalized_shape) != 1:
            raise ValueError(
                f"cannot inflate {where}: it normalises over {m.normalized_shape}, which includes "
                "spatial axes; only a LayerNorm over channels works in 3D as it is"
            )
        return m


def _factory(m: nn.Module) -> dict:
    """device and dtype of a layer's floating-point parameters or buffers, for its replacement."""
    tensors = [t for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    return {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}


def _with_weights(conv: nn.Module, kernel: torch.Tensor, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
    """Fill ``conv`` with ``kernel`` and ``bias``; ``requires_grad`` follows the 2D parameters."""
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    conv.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        conv.bias.requires_grad_(bias.requires_grad)
    return conv


def _with_state(norm: nn.Module, source: nn.Module) -> nn.Module:
    """Copy parameters, running statistics and ``requires_grad`` from ``source`` into ``norm``."""
    norm.load_state_dict(source.state_dict())
    for name, param in norm.named_parameters():
        param.requires_grad_(source.get_parameter(name).requires_grad)
    return norm


_PADS = {
    nn.ReflectionPad2d: nn.ReflectionPad3d,
    nn.ReplicationPad2d: nn.ReplicationPad3d,
    nn.CircularPad2d: nn.CircularPad3d,
}
# Base class -> converter; the first match wins. A subclass that overrides forward is refused:
# CrossDConv, an nn.Conv2d with its own forward, comes first.
_CONVERTERS: tuple[tuple[type[nn.Module], Callable[[_Inflater, nn.Module, str], nn.Module]], ...] = (
    (CrossDConv, _Inflater._crossd_conv),
    (nn.Conv2d, _Inflater._conv),
    (nn.ConvTranspose2d, _Inflater._conv_transpose),
    (nn.BatchNorm2d, _Inflater._batch_norm),
    (nn.InstanceNorm2d, _Inflater._instance_norm),
    (nn.MaxPool2d, _Inflater._max_pool),
    (nn.AvgPool2d, _Inflater._avg_pool),
    (nn.LPPool2d, _Inflater._lp_pool),
    (nn.MaxUnpool2d, _Inflater._max_unpool),
    (nn.AdaptiveAvgPool2d, _Inflater._adaptive_pool),
    (nn.AdaptiveMaxPool2d, _Inflater._adaptive_pool),
    (nn.Upsample, _Inflater._upsample),
    (nn.Dropout2d, _Inflater._dropout),
    (nn.Softmax2d, _Inflater._softmax),
    (nn.ConstantPad2d, _Inflater._pad),
    *((pad, _Inflater._pad) for pad in _PADS),
    (nn.LayerNorm, _Inflater._layer_norm),
)
# Layers whose depth geometry depends on their stage.
_GEOMETRY_TYPES = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.LPPool2d,
    nn.MaxUnpool2d,
    nn.Upsample,
    nn.ConstantPad2d,
    *_PADS,
)
