"""The rotation of a kernel bank as one matrix per rotation, built in a few dozen operations.

A rotated kernel is linear in the kernel: ``rotate_kernels(U, r)`` flattened is ``M(r) @ U``.
M is the decomposition of :mod:`napari_crossd.core.rotation` multiplied out. Each of its six
plane rotations (three shears) acts on a (k, k) plane and leaves the third axis alone, so
it is a (k^2, k^2) matrix, and as a (k^3, k^3) matrix it is that one repeated along the third
axis. All six come from one vectorised expression of their eighteen shift amounts, and M
(or the rows of its central plane, all Cross-D Conv's 2D forward needs) is five batched
products and the quarter turn (a column gather).

Why it is written this way: on a GPU the cost of a small layer is the number of kernel
launches, on a CPU the number of dispatched operations, not the arithmetic. Autograd over
the ~20 shears of the direct computation and their trigonometry took ~400 operations per
layer and step; here the operator's forward and backward take ~55 (see
``tests/test_core.py::test_layer_compute_operations_are_few``):

* the plane matrices and their derivatives in the rotation come from one complex-step
  evaluation (``f(x + ih) = f(x) + ih f'(x)``, exact to rounding), on tensors of k^4 entries;
* the backward through the five products is written out (the operator is a product of
  matrices, linear in each), and all six plane gradients are one batched product.
"""

from __future__ import annotations

import functools

import torch

from ._amp import backward_without_autocast
from .fourier import line_matrices
from .rotation import (
    _PLANES,
    COMPLEX_STEP,
    _check_rotation,
    _shear_amounts,
    _tangent_rotations,
    _turn_sources,
    pad_kernels,
    rotate_kernels,
)

__all__ = ["DENSE_UP_TO", "rotation_operator", "static_kernels"]

# Kernel sizes up to this one get the (k^3, k^3) plane matrices (~6 k^6 numbers per rotation,
# 2.8 MB at k = 7); larger supports rotate unit kernels through the shears instead.
DENSE_UP_TO = 9
# The plane rotated about each axis (d, h, w), as indices into (d, h, w).
_PLANE_AXES = tuple((a + 3, b + 3) for a, b in _PLANES)
# The six plane rotations in the order applied: H about w, h, d; then S about d, h, w.
_PLANE_ORDER = (2, 1, 0, 0, 1, 2)
# The quarter turn is applied after the third plane rotation.
_QUARTER_TURN_AFTER = 2


@functools.cache
def _plane_shear_layout(size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Where a plane rotation's three shears take their line-matrix entries, as (k^2, k^2) matrices.

    In the plane (a, b), flattened as ``x_a * k + x_b``: the first and third shears move
    along a by x_b (``S[X, Y] = lines[x_b, x_a, y_a]`` where x_b = y_b), the second along
    b by x_a (``lines[x_a, x_b, y_b]`` where x_a = y_a).

    Returns:
        (3, 1, 1) shear positions, (3, k^2, k^2) indices into a shear's flattened (k, k, k)
        line matrices, and the 0/1 mask.
    """
    axis = torch.arange(size)
    out_a, out_b, in_a, in_b = torch.meshgrid(axis, axis, axis, axis, indexing="ij")
    along_a = (out_b * size + out_a) * size + in_a, out_b == in_b
    along_b = (out_a * size + out_b) * size + in_b, out_a == in_a
    indices, masks = zip(along_a, along_b, along_a, strict=True)
    shape = (3, size * size, size * size)
    positions = torch.arange(3)[:, None, None]
    stacked = (positions, torch.stack(indices).reshape(shape), torch.stack(masks).reshape(shape))
    return tuple(t.to(device) for t in stacked)


@functools.cache
def _volume_layout(size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Where the (k^3, k^3) matrix of each of the six plane rotations takes its entries.

    ``D[X, Y] = P[(x_a, x_b), (y_a, y_b)]`` where x_c = y_c (c the rotation axis), else 0.

    Returns:
        (6, 1, 1) plane positions, (6, k^3, k^3) indices into the flattened (k^2, k^2) plane
        matrix, the 0/1 mask, (6, k^4, k) the flat (X, Y) positions holding each plane-matrix
        entry (for backward), and the (k^3, k^3) identity (whose rows select the output).
    """
    axis = torch.arange(size)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    out, into = grid[:, None, :], grid[None, :, :]
    indices, masks, positions = [], [], []
    for rotation_axis in _PLANE_ORDER:
        a, b = _PLANE_AXES[rotation_axis]
        indices.append((out[..., a] * size + out[..., b]) * size**2 + into[..., a] * size + into[..., b])
        masks.append(out[..., rotation_axis] == into[..., rotation_axis])
        flat = torch.arange(size**6).reshape(size**3, size**3)
        order = indices[-1][masks[-1]].argsort(stable=True)
        positions.append(flat[masks[-1]][order].reshape(size**4, size))
    planes = torch.arange(len(_PLANE_ORDER))[:, None, None]
    stacked = (planes, torch.stack(indices), torch.stack(masks), torch.stack(positions), torch.eye(size**3))
    return tuple(t.to(device) for t in stacked)


@functools.cache
def _inverse_quarter_turn_sources(size: int, device: torch.device) -> torch.Tensor:
    """(48, k^3): ``inverse[q, sources[q, n]] = n`` — the quarter turn as a column gather."""
    return _turn_sources(size, device).argsort(dim=-1)


def _plane_matrices(rotation: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The six (k^2, k^2) plane rotations of each rotation, in the order applied.

    Args:
        rotation: (N, 3) or (N, 4), real or complex (complex-stepped copies).

    Returns:
        (N, 6, k^2, k^2) in the dtype of ``rotation`` (float64 for real input) and (N,)
        quarter-turn indices.
    """
    if not rotation.is_complex():
        rotation = rotation.to(torch.float64)
    amounts, nearest = _shear_amounts(rotation)
    lines = line_matrices(amounts, size).reshape(len(rotation), 6, 3, size**3)
    position, index, mask = _plane_shear_layout(size, rotation.device)
    shears = (lines[:, :, position, index] * mask).flatten(0, 1)  # (N * 6, 3, k^2, k^2)
    planes = torch.bmm(torch.bmm(shears[:, 2], shears[:, 1]), shears[:, 0])  # the first shear applied first
    return planes.view(len(rotation), 6, size**2, size**2), nearest


def _volume_matrices(planes: torch.Tensor, size: int) -> torch.Tensor:
    """(R, 6, k^2, k^2) plane rotations -> (R, 6, k^3, k^3) as matrices on whole kernels."""
    which, index, mask, _, _ = _volume_layout(size, planes.device)
    return planes.flatten(2)[:, which, index] * mask


class _RotationOperator(torch.autograd.Function):
    """``M = D5 D4 D3 T D2 D1 D0`` restricted to ``rows``: six plane matrices and the quarter turn T.

    Forward keeps the partial products; backward propagates the gradient back through them
    (five products and a gather), forms the six plane-matrix gradients in one batched
    product and contracts them with the plane matrices' complex-step derivatives.
    """

    @staticmethod
    def forward(ctx, rotation, size, central_plane, dtype):
        # Exact in dtype also under mixed precision (and the backward receives dtype).
        with torch.autocast(rotation.device.type, enabled=False):
            return _RotationOperator._forward(ctx, rotation, size, central_plane, dtype)

    @staticmethod
    def _forward(ctx, rotation, size, central_plane, dtype):
        needs_grad = ctx.needs_input_grad[0]
        stepped = _tangent_rotations(rotation) if needs_grad else rotation
        planes, nearest = _plane_matrices(stepped, size)
        components = rotation.shape[-1] if needs_grad else 1
        planes = planes.view(len(rotation), components, 6, size**2, size**2)
        matrices = _volume_matrices(planes[:, 0].real.to(dtype), size)
        nearest = nearest[::components]
        inverse = _inverse_quarter_turn_sources(size, rotation.device)[nearest][:, None, :]
        start = size**2 * (size // 2) if central_plane else 0
        count = size**2 if central_plane else size**3
        partial = matrices[:, 5, start : start + count]  # the rows of D5 that M keeps
        factors = []  # the left factor of the products by D4, D3, D2, D1, D0
        for index in (4, 3, 2, 1, 0):
            if index == _QUARTER_TURN_AFTER:
                partial = partial.gather(-1, inverse.expand_as(partial))
            factors.append(partial)
            partial = torch.bmm(partial, matrices[:, index])
        if needs_grad:
            derivatives = (planes.imag / COMPLEX_STEP).to(dtype)
            ctx.save_for_backward(matrices, derivatives, nearest, *factors)
            ctx.rows, ctx.size = (start, count), size
        return partial

    @staticmethod
    @backward_without_autocast  # exact in dtype, as the forward
    def backward(ctx, grad):
        matrices, derivatives, nearest, *factors = ctx.saved_tensors
        size = ctx.size
        sources = _turn_sources(size, grad.device)[nearest][:, None, :]
        grads = [grad]  # with respect to the output of the product by D0, D1, ..., D5
        for index in (0, 1, 2, 3, 4):
            grad = torch.bmm(grad, matrices[:, index].transpose(-1, -2))
            if index == _QUARTER_TURN_AFTER:
                grad = grad.gather(-1, sources.expand_as(grad))
            grads.append(grad)
        which, _, _, positions, identity = _volume_layout(size, grad.device)
        start, count = ctx.rows
        selector = identity[start : start + count].to(grad.dtype).expand_as(grad)
        lefts = torch.stack([*factors[::-1], selector], dim=1)  # the left factor of D0, ..., D5
        grad_matrices = torch.bmm(lefts.flatten(0, 1).transpose(-1, -2), torch.stack(grads, dim=1).flatten(0, 1))
        grad_planes = grad_matrices.view(len(grad), -1)[:, which * size**6 + positions].sum(-1)  # (R, 6, k^4)
        grad_rotation = torch.bmm(derivatives.flatten(2), grad_planes.view(len(grad), -1, 1))
        return grad_rotation[..., 0], None, None, None


# Under torch.compile the operator runs as written: its complex-step derivatives need
# complex128 arithmetic to the last bit, which compiled kernels do not promise.
@torch.compiler.disable
def rotation_operator(
    rotation: torch.Tensor,
    kernel_size: int,
    *,
    central_plane: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The rotation as matrices: ``rotate_kernels(U, rotation)`` flattened == ``M @ U.flatten()``.

    Agrees with :func:`rotate_kernels` to rounding and is differentiable in ``rotation``
    (see the module docstring for how). Applying it is one matrix product over a whole
    kernel bank, far cheaper than shearing the bank itself.

    Args:
        rotation: (R, 3) axis-angle or (R, 4) quaternions, as in :func:`rotate_kernels`.
        kernel_size: odd k.
        central_plane: keep only the rows of the central (h, w) plane d = k // 2 (the map
            from the 3D kernel to Cross-D Conv's 2D kernel).
        dtype, device: of the result (``device`` defaults to that of ``rotation``).

    Returns:
        (R, k^3, k^3), or (R, k^2, k^3) with ``central_plane``.
    """
    _check_rotation(rotation)
    if kernel_size % 2 == 0:
        raise ValueError(f"rotation_operator needs an odd kernel size; got {kernel_size}")
    device = rotation.device if device is None else torch.device(device)
    rotation = rotation.to(device)
    size = kernel_size
    if size <= DENSE_UP_TO:
        return _RotationOperator.apply(rotation, size, central_plane, dtype)
    # M is orthogonal and rotate_kernels inverts exactly: row p of M is the unit kernel e_p
    # rotated by the inverse rotation.
    central = slice(size**2 * (size // 2), size**2 * (size // 2 + 1)) if central_plane else slice(None)
    units = torch.eye(size**3, dtype=dtype, device=device)[central]
    inverse = -rotation if rotation.shape[-1] == 3 else rotation * rotation.new_tensor([1.0, -1.0, -1.0, -1.0])
    return rotate_kernels(units.reshape(-1, size, size, size), inverse).flatten(2)



def static_kernels(
    weights: torch.Tensor,
    rotation: torch.Tensor | None = None,
    *,
    support: int | None = None,
    central_plane: bool = False,
) -> torch.Tensor:
    """The kernels a Cross-D layer with a static rotation (or none) convolves with.

    The one place that pads U to its support, rotates it (one operator per layer or per
    output channel) and takes the central plane: :class:`napari_crossd.core.CrossDConv`,
    inflation to Conv3d and the kernel inspector all call it.

    Args:
        weights: U, (C_out, C_in / groups, k, k, k).
        rotation: None, or (1, 3) / (C_out, 3) axis-angle (radians, (d, h, w) order).
        support: odd size >= k to zero-pad U to first (see :func:`pad_kernels`).
        central_plane: return the 2D kernels, the plane d = s // 2 of the rotated kernels.

    Returns:
        (C_out, C_in / groups, s, s, s), or (C_out, C_in / groups, s, s) with ``central_plane``;
        s = ``support`` or k.
    """
    kernels = weights if support is None else pad_kernels(weights, support)
    size = kernels.shape[-1]
    if rotation is None:
        return kernels[:, :, size // 2] if central_plane else kernels
    if rotation.ndim != 2 or len(rotation) not in (1, len(kernels)):
        raise ValueError(
            f"rotation must be (1, 3) or (C_out={len(kernels)}, 3) axis-angle; got shape {tuple(rotation.shape)}"
        )
    operator = rotation_operator(rotation, size, central_plane=central_plane, dtype=kernels.dtype,
                                 device=kernels.device)
    flat = kernels.flatten(2)
    if len(operator) == 1:  # one rotation for the layer: one product over the whole bank
        rotated = torch.mm(flat.flatten(0, 1), operator.squeeze(0).T)
    else:  # one per output channel
        rotated = torch.bmm(flat, operator.transpose(1, 2))
    return rotated.view(*kernels.shape[:2], *(size,) * (2 if central_plane else 3))
