"""Autocast (mixed precision) and the layer's custom autograd Functions.

Autocast casts the operations run while it is enabled, and that includes the forward of a
custom ``autograd.Function``; but the backward runs when ``loss.backward()`` is called, usually
after the autocast region has been left. A Function that rebuilds tensors in backward from
what it saved (the per-sample kernels, the mixed taps) then rebuilds them in float32 while the
incoming gradient is bfloat16 / float16, and its GEMMs and ``convolution_backward`` refuse the
mixed dtypes. ``torch.amp.custom_fwd`` / ``custom_bwd`` solve this for one device type fixed
when the Function is defined; the layer runs on any device, so these helpers do the same for
the device of the input.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["autocast_dtype", "backward_without_autocast", "cast_for_autocast"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type``, or None where it is not enabled."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":  # older torch: one query per device type
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


def cast_for_autocast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` in ``dtype`` as autocast would cast them: floating point but not float64.

    The casts are autograd operations outside the Function, so the gradients reaching the
    float32 parameters are cast back to float32 by autograd itself.
    """
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def backward_without_autocast(backward):
    """Run a Function's ``backward`` with autocast off: in the dtypes its forward computed in.

    A backward called inside an autocast region (``loss.backward()`` under ``torch.autocast``)
    would otherwise have its GEMMs cast to low precision and its convolutions not.
    """

    @functools.wraps(backward)
    def run(ctx, *grads):
        device_type = next(g.device.type for g in grads if g is not None)
        with torch.autocast(device_type, enabled=False):
            return backward(ctx, *grads)

    return run
