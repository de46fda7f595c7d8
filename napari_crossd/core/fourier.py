"""Exact sub-voxel kernel shifts, shears and plane rotations in the Fourier domain.

Convention:
    A kernel of odd size ``k`` along an axis is sampled at the centred coordinates
    ``x in {-(k-1)/2, ..., (k-1)/2}``. Shifts are periodic (the kernel is one period of a
    band-limited signal), so for odd ``k`` — no Nyquist bin — every operation here is
    unitary, real in and real out, and exactly invertible. Even sizes have a Nyquist bin
    whose shifted value is not real; they are refused (zero-pad to an odd size first,
    see :func:`napari_crossd.core.pad_kernels`).

    A linear map ``A`` acts on a kernel ``U`` as ``(T_A U)(y) = U(A^-1 y)``, so
    ``T_A T_B = T_{AB}``: the rightmost factor is applied first.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fourier_shift", "rotate_plane", "shear"]


def _axis_shape(ndim: int, dim: int, size: int) -> list[int]:
    shape = [1] * ndim
    shape[dim] = size
    return shape


def _centred_coordinates(size: int, dim: int, ndim: int, like: torch.Tensor) -> torch.Tensor:
    """Centred voxel coordinates along ``dim``, shaped to broadcast against an ``ndim`` tensor."""
    coords = torch.arange(size, device=like.device, dtype=like.dtype) - (size - 1) / 2
    return coords.reshape(_axis_shape(ndim, dim, size))


def fourier_shift(kernels: torch.Tensor, shift: torch.Tensor | float, dim: int) -> torch.Tensor:
    """Shift kernels along one axis by a real number of voxels: ``out(x) = U(x - shift)``.

    Args:
        kernels: real tensor (..., k, ...) with odd size ``k`` along ``dim``.
        shift: float or real tensor broadcastable to ``kernels`` with size 1 along ``dim``;
            one shift per line along ``dim`` (this is what makes a shear possible).
        dim: the axis to shift along.

    Returns:
        Tensor of the shape of ``kernels`` broadcast with ``shift``, same dtype.

    Example:
        >>> x = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
        >>> fourier_shift(x, 2.0, dim=0).round(decimals=6)
        tensor([0., 0., 0., 1., 0.])
    """
    dim = dim % kernels.ndim
    size = kernels.shape[dim]
    if size % 2 == 0:
        raise ValueError(
            f"fourier_shift needs an odd size along dim {dim} (no Nyquist bin), got {size}; "
            "zero-pad the kernels to an odd size first"
        )
    freq = torch.fft.fftfreq(size, device=kernels.device, dtype=kernels.dtype)
    freq = freq.reshape(_axis_shape(kernels.ndim, dim, size))
    angle = (-2 * math.pi) * freq * torch.as_tensor(shift, dtype=kernels.dtype, device=kernels.device)
    phase = torch.complex(torch.cos(angle), torch.sin(angle))
    spectrum = torch.fft.fft(kernels, dim=dim)
    return torch.fft.ifft(spectrum * phase, dim=dim).real


def shear(kernels: torch.Tensor, amount: torch.Tensor | float, shift_dim: int, coord_dim: int) -> torch.Tensor:
    """Shift every line along ``shift_dim`` by ``amount * x`` where x is its ``coord_dim`` coordinate.

    This is ``T_S`` for the shear ``S = I + amount * e_shift e_coord^T``.

    Args:
        kernels: real tensor (..., k, k, k) (any rank; both axes of odd size).
        amount: float or tensor broadcastable to ``kernels`` with size 1 along both axes
            (for a batch of kernels (R, ...), shape (R, 1, ..., 1)).
        shift_dim: axis along which lines move.
        coord_dim: axis whose centred coordinate scales the shift.

    Returns:
        The sheared kernels, shape of ``kernels`` broadcast with ``amount``.
    """
    ndim = kernels.ndim
    coord_dim = coord_dim % ndim
    coords = _centred_coordinates(kernels.shape[coord_dim], coord_dim, ndim, kernels)
    amount = torch.as_tensor(amount, dtype=kernels.dtype, device=kernels.device)
    return fourier_shift(kernels, amount * coords, shift_dim)


def rotate_plane(kernels: torch.Tensor, angle: torch.Tensor | float, dims: tuple[int, int]) -> torch.Tensor:
    """Rotate kernels in the plane ``dims = (a, b)`` by ``angle``, turning axis a towards b.

    Three shears (Paeth; Unser et al. 1995): ``R = S_ab(-tan(t/2)) S_ba(sin t) S_ab(-tan(t/2))``.
    Exact at every angle for the periodic band-limited kernel; meant for ``|angle| <= pi/2``
    (the shears grow as ``tan(angle/2)``: larger turns go through exact quarter turns first,
    see :func:`napari_crossd.core.rotate_kernels`). ``angle = pi/2`` equals
    ``torch.rot90(kernels, 1, dims)``.

    Args:
        kernels: real tensor (..., k, k, k), odd sizes along ``dims``.
        angle: radians; float or tensor broadcastable like ``amount`` in :func:`shear`.
        dims: the plane, ordered: positive angles turn ``dims[0]`` into ``dims[1]``.

    Returns:
        The rotated kernels.
    """
    a, b = dims
    angle = torch.as_tensor(angle, dtype=kernels.dtype, device=kernels.device)
    first = -torch.tan(angle / 2)
    kernels = shear(kernels, first, shift_dim=a, coord_dim=b)
    kernels = shear(kernels, torch.sin(angle), shift_dim=b, coord_dim=a)
    return shear(kernels, first, shift_dim=a, coord_dim=b)
