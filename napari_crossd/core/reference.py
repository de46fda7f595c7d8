"""The official Cross-D Conv kernel synthesis (github convergedmachine/Cross-D-Conv), reproduced.

The official layer builds a first-order rotation ``R = I + angle * K(axis)``, rotates the
frequency grid ``f' = R f`` and multiplies ``FFT3(U)`` by ``exp(-2 pi i (f'_d + f'_h + f'_w))``.
By the shift theorem that is a periodic translation of U by ``R^T (1, 1, 1)`` voxels, not
a rotation: at angle 0 its 2D kernel is ``roll(U, (1, 1, 1))[:, :, k // 2]``. We keep the
computation number for number so that official checkpoints behave as trained; as a
linear map of U it is applied like :func:`napari_crossd.core.rotation_operator`.

Convention: axes (d, h, w) = dims (-3, -2, -1), the official frequency grid
``meshgrid(fftfreq(k), ..., indexing="ij")``; the 2D kernel is the slice d = k // 2.
"""

from __future__ import annotations

import math

import torch

__all__ = ["first_order_rotation", "reference_operator"]


def first_order_rotation(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """``I + angle * K(axis)`` with K the cross-product matrix, as the official layer builds it.

    Args:
        axis: (B, 3) unit axes in (d, h, w) order.
        angle: (B,) or (B, 1) radians.

    Returns:
        (B, 3, 3); not a rotation for angle != 0 (first order only).
    """
    kd, kh, kw = axis.unbind(-1)
    zero = torch.zeros_like(kd)
    skew = torch.stack(
        [
            torch.stack([zero, -kw, kh], dim=-1),
            torch.stack([kw, zero, -kd], dim=-1),
            torch.stack([-kh, kd, zero], dim=-1),
        ],
        dim=-2,
    )
    eye = torch.eye(3, dtype=axis.dtype, device=axis.device)
    return eye + angle.reshape(-1, 1, 1) * skew


def reference_operator(
    matrix: torch.Tensor, kernel_size: int, *, central_plane: bool = True
) -> torch.Tensor:
    """The official synthesis as matrices on flattened kernels, one per ``matrix``.

    ``kernels_2d.flatten(-2) == M @ U.flatten(-3)`` where the official code computes
    ``ifftn(fftn(U) * exp(-2 pi i sum(R f))).real[..., k // 2, :, :]``. The phase is
    ``exp(-2 pi i f . s)`` with ``s = R^T (1, 1, 1)``: separable, so M is the real part of
    a Kronecker product of three 1D complex shift matrices ``(1/k) sum_n exp(2 pi i nu_n
    (i - j - s_a))`` (complex: an even k has a Nyquist bin whose shift is not real, and the
    official ``.real`` is taken after all three axes).

    Args:
        matrix: (B, 3, 3), e.g. from :func:`first_order_rotation`.
        kernel_size: k (any size; the official layer does not require odd k).
        central_plane: keep only the rows of the slice d = k // 2.

    Returns:
        (B, k^2, k^3), or (B, k^3, k^3) without ``central_plane``; dtype of ``matrix``.
    """
    size = kernel_size
    shifts = matrix.sum(dim=-2)  # (B, 3): R^T (1, 1, 1)
    freq = torch.fft.fftfreq(size, dtype=matrix.dtype, device=matrix.device)
    index = torch.arange(size, dtype=matrix.dtype, device=matrix.device)
    phase = (2 * math.pi) * ((index[:, None] - index[None, :])[..., None] - shifts[:, :, None, None, None]) * freq
    shift_matrices = torch.complex(torch.cos(phase), torch.sin(phase)).mean(dim=-1)  # (B, 3, k, k)
    along_d, along_h, along_w = shift_matrices.unbind(1)
    if central_plane:
        along_d = along_d[:, size // 2 : size // 2 + 1]
    operator = torch.einsum("bxX,byY,bzZ->bxyzXYZ", along_d, along_h, along_w).real
    return operator.reshape(matrix.shape[0], -1, size**3)
