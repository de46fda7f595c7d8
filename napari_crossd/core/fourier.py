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

import functools
import math

import torch

__all__ = [
    "apply_line_matrices",
    "fourier_shift",
    "line_matrices",
    "plane_rotation_amounts",
    "rotate_plane",
    "shear",
    "shift_matrices",
]


@functools.cache
def _shift_table(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Constants of :func:`shift_matrices`: (2k,) phase slopes and starts, (2k, k*k) basis, (k,) coordinates.

    The basis holds ``cos`` and ``sin`` of ``2 pi nu_n (i - j)``, over k; the slopes
    ``2 pi nu`` twice and the starts 0 then -pi/2, so that one cosine gives ``cos`` and ``sin``
    of the shift phases. float64 (complex128 for complex-step derivatives) whatever the
    kernels' dtype: the matrices are tiny, and so a float32 chain of 18 shears stays within 1e-5.
    """
    freq = torch.fft.fftfreq(size, dtype=torch.float64)
    index = torch.arange(size, dtype=torch.float64)
    phase = (2 * math.pi) * (index[:, None] - index[None, :])[..., None] * freq
    basis = (torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1) / size).reshape(size * size, 2 * size).T
    slopes = (2 * math.pi) * torch.cat([freq, freq])
    starts = torch.cat([torch.zeros(size), torch.full((size,), -math.pi / 2)]).to(torch.float64)
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return tuple(t.to(device, dtype).contiguous() for t in (slopes, starts, basis, coords))


def shift_matrices(shift: torch.Tensor, size: int) -> torch.Tensor:
    """The Fourier shift by ``shift`` voxels as real matrices: ``out[i] = sum_j D[i, j] u[j]``.

    ``D[i, j] = (1/k) sum_n cos(2 pi nu_n (i - j - shift))`` over ``nu = fftfreq(k)``: the real
    part of ``IFFT(FFT(u) * exp(-2 pi i nu shift))``, the periodic sinc. For odd k it is the
    whole of it (the frequencies are symmetric) and D is orthogonal.

    Args:
        shift: real tensor (...), or complex for complex-step derivatives (kept complex).
        size: k.

    Returns:
        (..., k, k), dtype of ``shift``.
    """
    # cos(a - b) = cos a cos b + sin a sin b: only the (..., 2k) phases of the shifts are
    # computed, against the cached table: three operations whatever the number of shifts.
    wide = shift if shift.is_complex() else shift.to(torch.float64)
    slopes, starts, basis, _ = _shift_table(size, wide.dtype, wide.device)
    waves = torch.cos(torch.addcmul(starts, wide.reshape(-1, 1), slopes))
    return torch.mm(waves, basis).view(*shift.shape, size, size).to(shift.dtype)


def fourier_shift(kernels: torch.Tensor, shift: torch.Tensor | float, dim: int) -> torch.Tensor:
    """Shift kernels along one axis by a real number of voxels: ``out(x) = U(x - shift)``.

    The Fourier shift theorem, applied as the equivalent real k x k matrix
    (:func:`shift_matrices`): for kernel sizes a small matrix product costs a fraction of
    an FFT pair and its complex arithmetic (a Cross-D ResNet-18's dynamic rotations built
    their operators ~20x faster this way on CPU).

    Args:
        kernels: real tensor (..., k, ...) with odd size ``k`` along ``dim``.
        shift: float or real tensor broadcastable to ``kernels`` with size 1 along ``dim``;
            one shift per line along ``dim`` (this is what makes a shear possible).
        dim: the axis to shift along.

    Returns:
        Tensor of the shape of ``kernels`` broadcast with ``shift``, same dtype.

    Example:
        >>> x = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
        >>> shifted = fourier_shift(x, 2.0, dim=0)  # an integer shift is a periodic roll
        >>> torch.allclose(shifted, torch.roll(x, 2), atol=1e-6)
        True
    """
    dim = dim % kernels.ndim
    size = kernels.shape[dim]
    if size % 2 == 0:
        raise ValueError(
            f"fourier_shift needs an odd size along dim {dim} (no Nyquist bin), got {size}; "
            "zero-pad the kernels to an odd size first"
        )
    shift = torch.as_tensor(shift, dtype=kernels.dtype, device=kernels.device)
    if shift.ndim:
        shift = shift.movedim(dim, -1).squeeze(-1)
    matrices = shift_matrices(shift, size)
    # Broadcast multiply-and-sum: a batched matmul of this many k x k matrices costs ~100x more.
    return (matrices * kernels.movedim(dim, -1).unsqueeze(-2)).sum(dim=-1).movedim(-1, dim)


def line_matrices(amount: torch.Tensor, size: int) -> torch.Tensor:
    """The shift matrices of a shear by ``amount``: line x_b moves by ``amount * x_b``.

    Args:
        amount: (...) shear factors.
        size: k along both axes of the shear.

    Returns:
        (..., k, k, k): for each amount, per line coordinate x_b, a (k, k) shift matrix.
    """
    coords = _shift_table(size, amount.dtype, amount.device)[3]
    return shift_matrices(amount[..., None] * coords, size)


def apply_line_matrices(kernels: torch.Tensor, matrices: torch.Tensor, shift_dim: int, coord_dim: int) -> torch.Tensor:
    """Apply per-line shift matrices from :func:`line_matrices` as a shear.

    Args:
        kernels: (R or 1, ..., k, k, k); ``shift_dim`` and ``coord_dim`` negative, among the
            last three axes.
        matrices: (R, k, k, k) — batch, line coordinate along ``coord_dim``, out, in.

    Returns:
        (R, ..., k, k, k).
    """
    moved = kernels.movedim((coord_dim, shift_dim), (-2, -1))
    moved = moved.expand(matrices.shape[0], *moved.shape[1:])
    lines = moved.reshape(moved.shape[0], -1, *moved.shape[-2:])  # (R, N, k_b, k_a)
    sheared = torch.einsum("rnba,rbca->rnbc", lines, matrices).reshape(moved.shape)
    return sheared.movedim((-2, -1), (coord_dim, shift_dim))


def _batched(kernels: torch.Tensor, value: torch.Tensor | float, dims: tuple[int, ...]):
    """Kernels with a leading batch axis, the value as (R,), the dims as negative indices."""
    value = torch.as_tensor(value, dtype=kernels.dtype, device=kernels.device)
    dims = tuple(d - kernels.ndim if d >= 0 else d for d in dims)
    if value.ndim > 1:
        raise ValueError(f"expected a float or a 1-D tensor of R values; got shape {tuple(value.shape)}")
    return kernels.unsqueeze(0), value.reshape(-1), dims, value.ndim == 0


def shear(kernels: torch.Tensor, amount: torch.Tensor | float, shift_dim: int, coord_dim: int) -> torch.Tensor:
    """Shift every line along ``shift_dim`` by ``amount * x`` where x is its ``coord_dim`` coordinate.

    This is ``T_S`` for the shear ``S = I + amount * e_shift e_coord^T``.

    Args:
        kernels: real tensor (..., k, k, k); both axes of odd size.
        amount: float, or (R,) tensor for R shears of the same kernels.
        shift_dim: axis along which lines move.
        coord_dim: axis whose centred coordinate scales the shift.

    Returns:
        The sheared kernels: shape of ``kernels``, with a leading R axis for a tensor ``amount``.
    """
    batched, amount, (shift_dim, coord_dim), scalar = _batched(kernels, amount, (shift_dim, coord_dim))
    _check_odd(kernels, (shift_dim, coord_dim))
    sheared = apply_line_matrices(batched, line_matrices(amount, kernels.shape[shift_dim]), shift_dim, coord_dim)
    return sheared[0] if scalar else sheared


def plane_rotation_amounts(angle: torch.Tensor) -> torch.Tensor:
    """The three shear factors of a plane rotation: (..., ) -> (..., 3)."""
    first = -torch.tan(angle / 2)
    return torch.stack([first, torch.sin(angle), first], dim=-1)


def rotate_plane(kernels: torch.Tensor, angle: torch.Tensor | float, dims: tuple[int, int]) -> torch.Tensor:
    """Rotate kernels in the plane ``dims = (a, b)`` by ``angle``, turning axis a towards b.

    Three shears (Paeth; Unser et al. 1995): ``R = S_ab(-tan(t/2)) S_ba(sin t) S_ab(-tan(t/2))``,
    so rotating by ``-angle`` inverts it exactly. Exact at every angle for the periodic
    band-limited kernel; meant for ``|angle| <= pi/2`` (the shears grow as ``tan(angle/2)``:
    larger turns go through exact quarter turns first, see
    :func:`napari_crossd.core.rotate_kernels`). ``angle = pi/2`` equals
    ``torch.rot90(kernels, 1, dims)``.

    Args:
        kernels: real tensor (..., k, k, k), odd sizes along ``dims``.
        angle: radians; float, or (R,) tensor for R rotations of the same kernels.
        dims: the plane, ordered: positive angles turn ``dims[0]`` into ``dims[1]``.

    Returns:
        The rotated kernels: shape of ``kernels``, with a leading R axis for a tensor ``angle``.
    """
    batched, angle, (a, b), scalar = _batched(kernels, angle, dims)
    _check_odd(kernels, (a, b))
    matrices = line_matrices(plane_rotation_amounts(angle), kernels.shape[a])
    for step, (shift_dim, coord_dim) in enumerate(((a, b), (b, a), (a, b))):
        batched = apply_line_matrices(batched, matrices[:, step], shift_dim, coord_dim)
    return batched[0] if scalar else batched


def _check_odd(kernels: torch.Tensor, dims: tuple[int, ...]) -> None:
    sizes = {kernels.shape[d] for d in dims}
    if len(sizes) != 1 or sizes.pop() % 2 == 0:
        raise ValueError(
            f"a shear or plane rotation needs equal odd sizes along dims {dims}; got shape {tuple(kernels.shape)}"
        )
