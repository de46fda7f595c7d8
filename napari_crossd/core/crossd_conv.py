"""Cross-D Conv: one 3D kernel bank for 2D and 3D input (Yavuz & Yang, arXiv 2411.02441).

Convention:
    The parameter ``weights_3d`` is U, shaped (C_out, C_in / groups, k, k, k) with axes
    (d, h, w). On (B, C, D, H, W) input the layer is ``conv3d`` with U (statically rotated
    if it has a static rotation). On (B, C, H, W) input it is ``conv2d`` with the central
    (h, w) slice d = k // 2 of U rotated in the Fourier domain: exactly by default
    (``rotation_mode="fourier"``, see :func:`napari_crossd.core.rotate_kernels`), or as the
    official code computes it (``rotation_mode="reference"``, see
    :mod:`napari_crossd.core.reference`). The layer is an ``nn.Conv2d``: ``stride``,
    ``padding`` and ``dilation`` are its (h, w) geometry; ``stride_3d``, ``padding_3d`` and
    ``dilation_3d`` the (d, h, w) geometry of 3D input.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._amp import autocast_dtype, backward_without_autocast, cast_for_autocast
from .operator import rotation_operator, static_kernels
from .reference import first_order_rotation, reference_operator
from .rotation import pad_kernels

__all__ = ["CrossDConv"]

ROTATIONS = ("none", "static", "dynamic")
ROTATION_MODES = ("fourier", "reference")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# Dynamic rotation: below this many output positions per sample, mixing input taps beats
# per-sample kernels. 2-core CPU, B=8, 3x3, fwd+bwd ms of the two paths against nn.Conv2d:
# 64ch 28x28: kernels 9.5, mixed 146, plain 7.6; 128ch 14x14: 15.5, 54, 7.0; 256ch 7x7:
# 36, 41, 7.2; 512ch 4x4: 314, 46, 9.7. Mixing costs 3x the multiply-adds; per-sample
# kernels cost B-fold kernel gradients, which dominate once feature maps are small.
MIXED_TAPS_BELOW = 64
# Channels of activation the dynamic rotation head keeps per input position (16 + 16 + 4).
HEAD_KEPT_CHANNELS = 36


def _triple(value: int | tuple[int, ...], name: str) -> tuple[int, int, int]:
    """An int, an (h, w) pair (depth takes h's value) or a (d, h, w) triple, as a triple."""
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(value)
    if len(value) == 2:
        value = (value[0], *value)
    if len(value) != 3 or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ValueError(f"{name} must be a non-negative int, an (h, w) pair or a (d, h, w) triple; got {value}")
    return value


def _per_sample_kernels(operator: torch.Tensor, weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B * C_out, C_in, kh, kw): the kernels ``operator[b] @ weights`` of every sample."""
    # A 2D @ 3D matmul writes (B, C_out * C_in, P) in place; an einsum broadcast the weights
    # B times and transposed the result (~3x slower on a Cross-D ResNet-18 step).
    kernels = torch.matmul(weights.reshape(-1, weights.shape[-1]), operator.transpose(1, 2))
    return kernels.reshape(-1, weights.shape[1], *size)


def _apply_in_one_dtype(function, x, operator, weights, bias, *options) -> torch.Tensor:
    """``function.apply`` with its tensors in one dtype: autocast's, where autocast is enabled.

    The per-sample Functions rebuild their kernels or taps in backward from the saved tensors.
    Left to autocast, the forward computed those in bfloat16 / float16 and the backward (run
    outside the autocast region) rebuilt them in float32 against a low-precision gradient.
    Casting the inputs here and running the Function with autocast off (what
    ``torch.amp.custom_fwd(cast_inputs=...)`` does, but for the input's device type) gives
    both passes the dtype autocast would have used for a plain conv.
    """
    device_type = x.device.type
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return function.apply(x, operator, weights, bias, *options)
    x, operator, weights, bias = cast_for_autocast(dtype, x, operator, weights, bias)
    with torch.autocast(device_type, enabled=False):
        return function.apply(x, operator, weights, bias, *options)


class _FrozenStatistics:
    """While entered, BatchNorm layers of a module normalise with batch statistics but leave
    their running ones. Re-entrant: a backward may recompute more than once."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        self.saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                      for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class _PerSampleConv2d(torch.autograd.Function):
    """conv2d of sample b with the kernels ``operator[b] @ weights``, without keeping them.

    Keeping B kernel banks for backward is what makes the official dynamic layer cost
    gigabytes; they are cheap to rebuild (one GEMM per sample) when backward needs them.
    """

    @staticmethod
    def forward(ctx, x, operator, weights, bias, stride, padding, dilation, groups, size):
        batch = x.shape[0]
        kernels = _per_sample_kernels(operator, weights, size)
        bias = None if bias is None else bias.repeat(batch)
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), kernels, bias, stride, padding, dilation, batch * groups)
        ctx.save_for_backward(x, operator, weights)
        ctx.options = (stride, padding, dilation, groups, size, bias is not None)
        return out.reshape(batch, -1, *out.shape[2:])

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad_out):
        x, operator, weights = ctx.saved_tensors
        stride, padding, dilation, groups, size, has_bias = ctx.options
        need_x, need_operator, need_weights, need_bias = ctx.needs_input_grad[:4]
        batch = x.shape[0]
        kernels = _per_sample_kernels(operator, weights, size)
        grad_x, grad_kernels, grad_bias = torch.ops.aten.convolution_backward(
            grad_out.reshape(1, -1, *grad_out.shape[2:]),
            x.reshape(1, -1, *x.shape[2:]),
            kernels,
            [kernels.shape[0]] if has_bias else None,
            list(stride), list(padding), list(dilation), False, [0, 0], batch * groups,
            [need_x, need_operator or need_weights, has_bias and need_bias],
        )
        grad_operator = grad_weights = None
        if grad_kernels is not None:
            grad_kernels = grad_kernels.reshape(batch, -1, operator.shape[1])  # (B, C_out * C_in, P)
            flat = weights.reshape(-1, weights.shape[-1])
            if need_operator:  # per sample, in one batched product: long inner dimension
                grad_operator = torch.bmm(grad_kernels.transpose(1, 2), flat.expand(batch, *flat.shape))
            if need_weights:  # one GEMM over all samples' taps
                stacked = grad_kernels.transpose(0, 1).reshape(flat.shape[0], -1)
                grad_weights = (stacked @ operator.reshape(-1, flat.shape[1])).reshape(weights.shape)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        if grad_bias is not None:
            grad_bias = grad_bias.reshape(batch, -1).sum(0)
        return grad_x, grad_operator, grad_weights, grad_bias, None, None, None, None, None


class _MixedTapConv2d(torch.autograd.Function):
    """The same per-sample conv computed without per-sample kernels (groups == 1).

    ``sum_p (M_b U)[o, i, p] X[i, p] = sum_q U[o, i, q] (M_b^T X)[i, q]``: mix each sample's
    k^2 input taps (unfolded patches) into k^3 taps with its operator, then apply U to all
    samples in one GEMM. Three times a conv's multiply-adds, but no B x C_out x C_in kernel
    banks and their gradients: where feature maps are small and channels many (a ResNet's
    last stages) that is several times faster than the grouped conv. The mixed taps are
    rebuilt in backward rather than kept.
    """

    @staticmethod
    def _mixed_taps(x, operator, kernel_size, stride, padding, dilation):
        """Unfolded input taps (B, C_in, P, L) and the mixed taps (C_in * Q, B * L)."""
        cols = F.unfold(x, kernel_size, dilation, padding, stride)  # (B, C_in * P, L)
        cols = cols.reshape(x.shape[0], x.shape[1], operator.shape[1], -1)
        mixed = torch.matmul(operator.transpose(1, 2).unsqueeze(1), cols)  # (B, C_in, Q, L)
        # Samples side by side: one GEMM of inner size C_in * Q and width B * L, where B
        # GEMMs of width L (16 on a ResNet's last stage) ran at a fraction of the speed.
        return cols, mixed.permute(1, 2, 0, 3).reshape(-1, x.shape[0] * cols.shape[-1])

    @staticmethod
    def forward(ctx, x, operator, weights, bias, stride, padding, dilation, size, out_size):
        batch = x.shape[0]
        _, mixed = _MixedTapConv2d._mixed_taps(x, operator, size, stride, padding, dilation)
        flat = weights.reshape(weights.shape[0], -1)
        out = (flat @ mixed).reshape(flat.shape[0], batch, -1).transpose(0, 1)
        if bias is not None:
            out = out + bias[:, None]
        ctx.save_for_backward(x, operator, weights)
        ctx.options = (stride, padding, dilation, size, bias is not None)
        return out.reshape(batch, -1, *out_size)

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad_out):
        x, operator, weights = ctx.saved_tensors
        stride, padding, dilation, size, has_bias = ctx.options
        need_x, need_operator, need_weights, need_bias = ctx.needs_input_grad[:4]
        batch, channels = x.shape[:2]
        cols, mixed = _MixedTapConv2d._mixed_taps(x, operator, size, stride, padding, dilation)
        flat = weights.reshape(weights.shape[0], -1)
        grad_out = grad_out.reshape(batch, flat.shape[0], -1).transpose(0, 1).reshape(flat.shape[0], -1)
        grad_x = grad_operator = grad_weights = grad_bias = None
        if need_weights:
            grad_weights = (grad_out @ mixed.T).reshape(weights.shape)
        if need_bias and has_bias:
            grad_bias = grad_out.sum(1)
        if need_x or need_operator:
            taps = operator.shape[2]
            grad_mixed = (flat.T @ grad_out).reshape(channels, taps, batch, -1).permute(2, 0, 1, 3)
            if need_operator:
                grad_operator = torch.matmul(cols, grad_mixed.transpose(-1, -2)).sum(1)
            if need_x:
                grad_cols = torch.matmul(operator.unsqueeze(1), grad_mixed).reshape(batch, -1, cols.shape[-1])
                grad_x = F.fold(grad_cols, x.shape[2:], size, dilation, padding, stride)
        return grad_x, grad_operator, grad_weights, grad_bias, None, None, None, None, None


@dataclass(frozen=True)
class _Geometry:
    """CrossDConv's checked kernel edge and (d, h, w) stride, padding and dilation."""

    kernel_size: int
    stride: tuple[int, int, int]
    padding: tuple[int, int, int] | str
    dilation: tuple[int, int, int]


def _checked_arguments(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                       padding_mode, rotation, rotation_mode, kernel_support) -> _Geometry:
    """The geometry of a valid CrossDConv; ValueError naming the first argument that is not."""
    if not isinstance(kernel_size, int):
        sizes = set(kernel_size)
        if len(sizes) != 1:
            raise ValueError(f"CrossDConv keeps a cubic k x k x k kernel; got kernel_size={kernel_size}")
        kernel_size = sizes.pop()
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
        )
    for name, value, allowed in (("rotation", rotation, ROTATIONS), ("rotation_mode", rotation_mode, ROTATION_MODES),
                                 ("padding_mode", padding_mode, PADDING_MODES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    if kernel_support is None and kernel_size % 2 == 0 and rotation_mode == "fourier":
        raise ValueError(
            f"kernel_size {kernel_size} is even: Cross-D Conv needs a central slice. Pass "
            f"kernel_support={kernel_size + 1} to zero-pad the kernel to an odd size"
        )
    if kernel_support is not None and (kernel_support % 2 == 0 or kernel_support < kernel_size):
        raise ValueError(f"kernel_support must be odd and >= kernel_size ({kernel_size}); got {kernel_support}")
    geometry = _Geometry(kernel_size, _triple(stride, "stride"), padding, _triple(dilation, "dilation"))
    if not isinstance(padding, str):
        geometry = replace(geometry, padding=_triple(padding, "padding"))
    elif padding not in ("same", "valid"):
        raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid'; got {padding!r}")
    elif padding == "same" and geometry.stride != (1, 1, 1):
        raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv)")
    if rotation_mode == "reference":
        _check_reference_mode(bias, geometry, groups, padding_mode, rotation, kernel_support)
    return geometry


def _check_reference_mode(bias, geometry: _Geometry, groups, padding_mode, rotation, kernel_support) -> None:
    unsupported = {
        "bias=True": bias,
        "dilation != 1": geometry.dilation != (1, 1, 1),
        "groups != 1": groups != 1,
        f"padding_mode={padding_mode!r}": padding_mode != "zeros",
        "rotation='static'": rotation == "static",
        "kernel_support": kernel_support is not None,
    }
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise ValueError(
            "rotation_mode='reference' reproduces the official layer, which has no bias, "
            "dilation, groups, padding modes, static rotation or kernel support; "
            f"cannot reproduce {', '.join(refused)}"
        )


class CrossDConv(nn.Conv2d):
    """A convolution that keeps a 3D kernel and applies it to 2D and 3D input.

    An ``nn.Conv2d`` to code that asks (as timm's ``StdConv2d``): its ``kernel_size``,
    ``stride``, ``padding`` and ``dilation`` are the (h, w) ones its 2D forward uses, and
    :attr:`weight` is the 2D kernel that forward synthesises from U. U itself is the
    parameter ``weights_3d``; the 3D forward uses ``stride_3d``, ``padding_3d`` and
    ``dilation_3d`` ((d, h, w); depth copies h unless a triple was given).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode: as ``nn.Conv2d`` / ``nn.Conv3d``; kernel_size is one int k (the
            kernel is a k^3 cube); padding may also be ``"same"`` or ``"valid"``.
        rotation: ``"none"``; ``"static"``, a learned axis-angle (radians, (d, h, w) order)
            per layer or, with ``rotation_per_channel``, per output channel; or
            ``"dynamic"``, predicted per sample from the 2D input as in the paper (1x1 conv,
            BatchNorm, ReLU, 1x1 conv to 4 channels, spatial-softmax pooling, axis
            normalised, angle = (pi / 4) tanh). 3D input is convolved with the un-rotated U
            under dynamic rotation, as the official evaluation does.
        rotation_mode: ``"fourier"`` (exact rotation) or ``"reference"`` (the official
            computation, parameter names that load official state dicts as they are).
        rotation_per_channel: one static rotation per output channel.
        kernel_support: odd size >= k to zero-pad U to before rotating: required for an
            even k, and keeps large rotations from wrapping round the k-cube. The conv then
            uses the larger kernel with padding grown to keep nn.Conv's output shape.

    Shape:
        (B, C_in, H, W) -> (B, C_out, H', W') and (B, C_in, D, H, W) -> (B, C_out, D', H', W'),
        H', W', D' as for ``nn.Conv2d`` / ``nn.Conv3d`` with the same arguments.

    Example:
        >>> conv = CrossDConv(3, 8, 3, padding=1, rotation="static")
        >>> conv(torch.randn(2, 3, 16, 16)).shape, conv(torch.randn(2, 3, 4, 16, 16)).shape
        (torch.Size([2, 8, 16, 16]), torch.Size([2, 8, 4, 16, 16]))
        >>> conv
        CrossDConv(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), rotation='static')
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        rotation: str = "none",
        rotation_mode: str = "fourier",
        *,
        rotation_per_channel: bool = False,
        kernel_support: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        geometry = _checked_arguments(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                      bias, padding_mode, rotation, rotation_mode, kernel_support)
        plane = geometry.padding if isinstance(geometry.padding, str) else geometry.padding[1:]
        # nn.Conv2d's own tensors on the meta device: its (C_out, C_in, k, k) weight is replaced by U.
        super().__init__(in_channels, out_channels, geometry.kernel_size, geometry.stride[1:], plane,
                         geometry.dilation[1:], groups, bias, padding_mode, device="meta")
        del self.weight, self.bias
        self.stride_3d, self.padding_3d, self.dilation_3d = geometry.stride, geometry.padding, geometry.dilation
        self.rotation = rotation
        self.rotation_mode = rotation_mode
        self.rotation_per_channel = rotation_per_channel
        self.kernel_support = kernel_support
        factory = {"device": device, "dtype": dtype}
        k = geometry.kernel_size
        self.weights_3d = nn.Parameter(torch.empty(out_channels, in_channels // groups, k, k, k, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if rotation == "static":
            rows = out_channels if rotation_per_channel else 1
            self.rotation_vector = nn.Parameter(torch.zeros(rows, 3, **factory))
        if rotation == "dynamic":
            self.rotation_params = nn.Sequential(
                nn.Conv2d(in_channels, 16, kernel_size=1, **factory),
                nn.BatchNorm2d(16, **factory),
                nn.ReLU(inplace=True),
                nn.Conv2d(16, 4, kernel_size=1, **factory),
            )
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if "weights_3d" not in self._parameters:  # nn.Conv2d.__init__, before U exists
            return
        # As the official layer; the 2D bias bound is nn.Conv2d's (fan-in of the 2D kernel).
        nn.init.kaiming_normal_(self.weights_3d, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weights_3d.shape[1] * self.kernel_size[0] ** 2)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The 2D kernel the 2D forward applies (C_out, C_in / groups, s, s), synthesised from U:
        rotated by a static rotation, U's central slice otherwise (a dynamic layer rotates it per
        sample). Derived, not a parameter: train ``weights_3d``."""
        return self._cached_static_kernel(2)

    @property
    def _support(self) -> int:
        return self.kernel_support or self.kernel_size[0]

    def predict_rotation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dynamic rotation of each sample: unit axes (B, 3) in (d, h, w) order and angles (B,)."""
        rotation_map = self.rotation_params(x).flatten(2)
        # The pooling, normalisation and tanh in float32 at least: CUDA autocast would run the
        # softmax in float32 but CPU autocast keeps bfloat16, and a bfloat16 rotation is
        # coarse (and one the reference synthesis, complex arithmetic, cannot take).
        if rotation_map.dtype in (torch.float16, torch.bfloat16):
            rotation_map = rotation_map.float()
        pooled = (rotation_map * rotation_map.softmax(dim=-1)).sum(dim=-1)
        axis = pooled[:, :3] / (pooled[:, :3].norm(dim=1, keepdim=True) + 1e-8)
        angle = torch.tanh(pooled[:, 3]) * (math.pi / 4)
        return axis, angle

    def _rotation_for_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_rotation`, its activations recomputed in backward where they are large.

        The head keeps about 36 channels at the layer's input resolution (16 + 16 + 4): on a
        stem of 3 input channels that is more memory than the whole next stage (a Cross-D
        ResNet-18 step: 105 MB without recomputation, 84 MB with it; plain ResNet-18 51 MB).
        On wider layers it is a small share and recomputing costs more time than it saves
        memory. BatchNorm statistics are frozen during the recomputation, so they move once
        per step.
        """
        if not torch.is_grad_enabled() or self.in_channels >= HEAD_KEPT_CHANNELS:
            return self.predict_rotation(x)
        return checkpoint(
            self.predict_rotation, x, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _FrozenStatistics(self.rotation_params)),
        )

    def _plane_operator(self, axis: torch.Tensor | None = None, angle: torch.Tensor | None = None) -> torch.Tensor:
        """(R, s^2, s^3) maps from the (padded) 3D kernel to the 2D kernel.

        For the layer's static rotation (or none) when ``axis`` is None, else for the
        per-sample rotations by ``angle`` (B,) about the unit ``axis`` (B, 3).
        """
        weights = self.weights_3d
        if self.rotation_mode == "reference":
            if axis is None:
                matrix = torch.eye(3, dtype=weights.dtype, device=weights.device).unsqueeze(0)
            else:
                matrix = first_order_rotation(axis, angle)
            return reference_operator(matrix, self.kernel_size[0])
        rotvec = self.rotation_vector if axis is None else axis * angle[:, None]
        return rotation_operator(rotvec, self._support, central_plane=True, dtype=weights.dtype)

    def _support_kernels(self) -> torch.Tensor:
        if self.kernel_support is None:
            return self.weights_3d
        return pad_kernels(self.weights_3d, self.kernel_support)

    def _static_kernel(self, spatial_dims: int) -> torch.Tensor:
        """The kernel of a layer without dynamic rotation, or the 3D kernel of a dynamic one."""
        central_plane = spatial_dims == 2
        if self.rotation_mode == "reference" and central_plane:  # the official synthesis at angle 0
            kernels = torch.mm(self.weights_3d.flatten(0, 1).flatten(1), self._plane_operator().squeeze(0).T)
            return kernels.view(*self.weights_3d.shape[:2], *self.kernel_size)
        if self.rotation != "static":  # U itself (its support only adds zeros)
            return static_kernels(self.weights_3d, central_plane=central_plane)
        return static_kernels(self.weights_3d, self.rotation_vector, support=self.kernel_support,
                              central_plane=central_plane)

    def _cached_static_kernel(self, spatial_dims: int) -> torch.Tensor:
        # Inference re-uses the synthesised kernel until a parameter changes in place.
        if self.training or torch.is_grad_enabled():
            return self._static_kernel(spatial_dims)
        params = [self.weights_3d] + ([self.rotation_vector] if self.rotation == "static" else [])
        key = (spatial_dims, torch.is_inference_mode_enabled(), self.weights_3d.dtype, self.weights_3d.device)
        key += tuple((p.data_ptr(), p._version) for p in params)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._static_kernel(spatial_dims))
        return self._cache[1]

    def _pad(self, x: torch.Tensor, extent: int) -> tuple[torch.Tensor, list[int]]:
        """Pad ``x`` for a kernel of ``extent`` taps per axis; returns it and conv's own padding.

        A kernel grown to its support needs more padding on the side it grew, so that the
        output keeps nn.Conv's shape; uneven or non-zero padding is done here with F.pad.
        """
        spatial, k = x.ndim - 2, self.kernel_size[0]
        low_extra = (extent - k) // 2
        high_extra = extent - k - low_extra
        pairs = []
        for axis in range(3 - spatial, 3):
            dilation = self.dilation_3d[axis]
            if self.padding_3d == "valid":
                low = high = 0
            elif self.padding_3d == "same":
                total = dilation * (k - 1)
                low, high = total // 2, total - total // 2
            else:
                low = high = self.padding_3d[axis]
            pairs.append((low + low_extra * dilation, high + high_extra * dilation))
        if self.padding_mode == "zeros" and all(low == high for low, high in pairs):
            return x, [low for low, _ in pairs]
        flat = [amount for pair in reversed(pairs) for amount in pair]
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, flat, mode=mode), [0] * spatial

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim not in (4, 5):
            raise ValueError(
                f"CrossDConv expects (B, C, H, W) or (B, C, D, H, W) input; got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"CrossDConv expects {self.in_channels} input channels (dim 1); got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"CrossDConv expects a floating-point input; got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.ndim == 5:
            kernel = self._cached_static_kernel(3)
            x, padding = self._pad(x, kernel.shape[-1])
            return F.conv3d(x, kernel, self.bias, self.stride_3d, padding, self.dilation_3d, self.groups)
        if self.rotation == "dynamic":
            return self._dynamic_forward(x)
        weight = self.weight
        x, padding = self._pad(x, weight.shape[-1])
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def _dynamic_forward(self, x: torch.Tensor) -> torch.Tensor:
        """2D forward with a rotation per sample: kernels built per sample, or input taps mixed."""
        axis, angle = self._rotation_for_forward(x)
        operator = self._plane_operator(axis, angle)
        x, padding = self._pad(x, self._support)
        kernels = self._support_kernels().flatten(2)
        size = (self._support,) * 2
        out_size = [(n + 2 * p - d * (self._support - 1) - 1) // s + 1
                    for n, p, d, s in zip(x.shape[2:], padding, self.dilation, self.stride, strict=True)]
        if self.groups == 1 and out_size[0] * out_size[1] < MIXED_TAPS_BELOW:
            function, options = _MixedTapConv2d, (self.stride, padding, self.dilation, size, out_size)
        else:
            function, options = _PerSampleConv2d, (self.stride, padding, self.dilation, self.groups, size)
        return _apply_in_one_dtype(function, x, operator, kernels, self.bias, *options)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        depth = {"stride_3d": self.stride[:1] + self.stride, "dilation_3d": self.dilation[:1] + self.dilation,
                 "padding_3d": self.padding if isinstance(self.padding, str) else self.padding[:1] + self.padding}
        for name, copied in depth.items():
            if getattr(self, name) != copied:  # a depth unlike h was asked for
                text += f", {name}={getattr(self, name)}"
        if self.rotation != "none":
            text += f", rotation={self.rotation!r}"
        if self.rotation_per_channel:
            text += ", rotation_per_channel=True"
        if self.rotation_mode != "fourier":
            text += f", rotation_mode={self.rotation_mode!r}"
        if self.kernel_support is not None:
            text += f", kernel_support={self.kernel_support}"
        return text
