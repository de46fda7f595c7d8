"""Exact 3D rotation of kernel banks: quarter turns, then at most nine Fourier shears.

Convention:
    Kernels are (..., k, k, k) with axes (d, h, w) = dims (-3, -2, -1) and centred
    coordinates ``x - (k-1)/2``. Rotations are right-handed in (d, h, w): a positive turn
    about d takes h to w, about h takes w to d, about w takes d to h, so

    * +pi/2 about d == ``torch.rot90(kernels, 1, dims=(-2, -1))``
    * +pi/2 about h == ``torch.rot90(kernels, 1, dims=(-1, -3))``
    * +pi/2 about w == ``torch.rot90(kernels, 1, dims=(-3, -2))``

    The rotated kernel is ``(T_R U)(y) = U(R^-1 y)``. Shifts are periodic on the k-grid (see
    :mod:`napari_crossd.core.fourier`): rotation is unitary — norm preserving, exactly
    invertible, differentiable in the kernels and the angles — and a quarter turn is an
    exact voxel permutation. What falls off the grid wraps round; pad to a larger support
    (:func:`pad_kernels`) where that matters more than the kernel's size.

How: ``R = S Q H``. ``Q`` is the nearest of the 24 quarter-turn rotations of the cube (an
exact voxel permutation), ``H`` the square root of the residual ``Q^T R`` (at most ~32
degrees) and ``S = Q H Q^T``. ``S`` is written as three plane rotations about d, then h,
then w, and ``H`` about w, then h, then d; each plane rotation is three shears. The
mirrored orders make the inverse rotation's decomposition the exact reverse of this one,
so rotating by ``r`` and then by ``-r`` returns the kernel to rounding, and no angle comes
near gimbal lock or the large shears of turns beyond 90 degrees.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from .fourier import apply_line_matrices, line_matrices, plane_rotation_amounts

__all__ = [
    "axis_angle_to_matrix",
    "pad_kernels",
    "quaternion_to_matrix",
    "rotate_kernels",
    "rotation_operator",
]


@functools.cache
def _levi_civita() -> torch.Tensor:
    symbol = torch.zeros(3, 3, 3, dtype=torch.float64)
    for i, j, k in itertools.permutations(range(3)):
        symbol[i, j, k] = torch.linalg.det(torch.eye(3, dtype=torch.float64)[[i, j, k]])
    return symbol


def quaternion_to_matrix(quaternion: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from quaternions (q0, qd, qh, qw), scalar first; normalised here.

    Args:
        quaternion: (..., 4).

    Returns:
        (..., 3, 3) rotation matrices acting on (d, h, w) coordinates.
    """
    quaternion = F.normalize(quaternion, dim=-1)
    scalar, vector = quaternion[..., :1, None], quaternion[..., 1:]
    eye = torch.eye(3, dtype=quaternion.dtype, device=quaternion.device)
    # R = (w^2 - |v|^2) I + 2 v v^T + 2 w [v]x, with [v]x[i, j] = -epsilon_ijk v_k.
    levi_civita = _levi_civita().to(device=quaternion.device, dtype=quaternion.dtype)
    cross = -(vector @ levi_civita.reshape(9, 3).T).reshape(*vector.shape[:-1], 3, 3)
    outer = vector[..., :, None] * vector[..., None, :]
    squared_norm = (vector * vector).sum(-1)[..., None, None]
    return (scalar.square() - squared_norm) * eye + 2 * outer + 2 * scalar * cross


def _axis_angle_to_quaternion(rotvec: torch.Tensor) -> torch.Tensor:
    # sin(t/2)/t written as a sinc, so that the identity has a gradient too.
    angle = torch.linalg.vector_norm(rotvec, dim=-1, keepdim=True)
    sin_half_over_angle = 0.5 * torch.sinc(angle / (2 * math.pi))
    return torch.cat([torch.cos(angle / 2), rotvec * sin_half_over_angle], dim=-1)


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from axis-angle (Rodrigues) vectors in radians, (d, h, w) order.

    Args:
        rotvec: (..., 3).

    Returns:
        (..., 3, 3).
    """
    return quaternion_to_matrix(_axis_angle_to_quaternion(rotvec))


@functools.cache
def _quarter_turns() -> torch.Tensor:
    """The 24 proper rotations of the cube: signed permutation matrices with determinant 1."""
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            mat = torch.zeros(3, 3, dtype=torch.float64)
            for row, (col, sign) in enumerate(zip(perm, signs, strict=True)):
                mat[row, col] = sign
            if torch.linalg.det(mat) > 0:
                mats.append(mat)
    return torch.stack(mats)


@functools.cache
def _quarter_turn_sources(size: int, device: torch.device) -> torch.Tensor:
    """(24, size**3) flat source index of every output voxel under each quarter turn.

    ``(T_Q U)(y) = U(Q^T y)`` on centred integer coordinates, which stay on the grid.
    """
    centre = (size - 1) // 2
    axis = torch.arange(size, dtype=torch.float64) - centre
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    source = torch.einsum("nj,qji->qni", grid, _quarter_turns()).round().long()
    source = source + centre
    flat = (source[..., 0] * size + source[..., 1]) * size + source[..., 2]
    return flat.to(device)


def _quaternion_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Hamilton product, scalar first: the rotation ``left`` after ``right``."""
    w1, v1 = left[..., :1], left[..., 1:]
    w2, v2 = right[..., :1], right[..., 1:]
    scalar = w1 * w2 - (v1 * v2).sum(-1, keepdim=True)
    vector = w1 * v2 + w2 * v1 + torch.linalg.cross(v1, v2, dim=-1)
    return torch.cat([scalar, vector], dim=-1)


def _conjugate(quaternion: torch.Tensor) -> torch.Tensor:
    return torch.cat([quaternion[..., :1], -quaternion[..., 1:]], dim=-1)


@functools.cache
def _quarter_turn_quaternions() -> torch.Tensor:
    """(24, 4) unit quaternions of :func:`_quarter_turns` (Shepperd's method, exact here)."""
    quaternions = []
    for mat in _quarter_turns():
        diagonal = torch.cat([mat.trace().reshape(1), mat.diagonal()])
        largest = int(diagonal.argmax())
        if largest == 0:
            w = (1 + mat.trace()).sqrt() / 2
            q = [w, (mat[2, 1] - mat[1, 2]) / (4 * w), (mat[0, 2] - mat[2, 0]) / (4 * w),
                 (mat[1, 0] - mat[0, 1]) / (4 * w)]
        else:
            i = largest - 1
            j, k = (i + 1) % 3, (i + 2) % 3
            v = [0.0, 0.0, 0.0]
            v[i] = (1 + mat[i, i] - mat[j, j] - mat[k, k]).sqrt() / 2
            v[j] = (mat[j, i] + mat[i, j]) / (4 * v[i])
            v[k] = (mat[k, i] + mat[i, k]) / (4 * v[i])
            q = [(mat[k, j] - mat[j, k]) / (4 * v[i]), *v]
        quaternions.append(torch.stack([torch.as_tensor(c, dtype=torch.float64) for c in q]))
    return torch.stack(quaternions)


def _euler_dhw(rotation: torch.Tensor) -> torch.Tensor:
    """Angles (a, b, c) with ``rotation = R_w(c) R_h(b) R_d(a)``; (R, 3, 3) -> (R, 3)."""
    about_d = torch.atan2(rotation[:, 2, 1], rotation[:, 2, 2])
    about_h = torch.asin((-rotation[:, 2, 0]).clamp(-1.0, 1.0))
    about_w = torch.atan2(rotation[:, 1, 0], rotation[:, 0, 0])
    return torch.stack([about_d, about_h, about_w], dim=-1)


# The plane turned by a positive rotation about d, h and w.
_PLANES = ((-2, -1), (-1, -3), (-3, -2))


def _as_quaternions(rotation: torch.Tensor) -> torch.Tensor:
    if rotation.ndim != 2 or rotation.shape[-1] not in (3, 4):
        raise ValueError(
            "rotation must have shape (R, 3) (axis-angle, radians, (d, h, w) order) or (R, 4) "
            f"(unit quaternions, scalar first); got {tuple(rotation.shape)}"
        )
    if rotation.shape[-1] == 4:
        return F.normalize(rotation, dim=-1)
    return _axis_angle_to_quaternion(rotation)


def pad_kernels(kernels: torch.Tensor, support: int) -> torch.Tensor:
    """Zero-pad the last three axes of ``kernels`` to an odd ``support``.

    The trade-off: a larger support keeps what a rotation moves out of the ``k``-cube from
    wrapping round, at the price of a larger kernel. An even ``k`` has no central voxel;
    its padding puts the extra zero on the high side, so its centre is taken at index
    ``k // 2`` (the convention of the official Cross-D layer and of ``rot90``-free slicing).

    Args:
        kernels: (..., k, k, k).
        support: odd size >= k.

    Returns:
        (..., support, support, support).
    """
    size = kernels.shape[-1]
    if support % 2 == 0 or support < size:
        raise ValueError(f"support must be odd and >= the kernel size {size}; got {support}")
    low = (support - size) // 2
    high = support - size - low
    return F.pad(kernels, (low, high) * 3)


def rotate_kernels(
    kernels: torch.Tensor, rotation: torch.Tensor, support: int | None = None
) -> torch.Tensor:
    """Rotate a kernel bank by many rotations at once, exactly (see the module docstring).

    Args:
        kernels: real (..., k, k, k), axes (d, h, w); k odd unless ``support`` is given.
        rotation: (R, 3) axis-angle vectors (radians, (d, h, w) order) or (R, 4) unit
            quaternions (scalar first).
        support: optional odd size >= k to zero-pad to before rotating (required for even k).

    Returns:
        (R, ..., s, s, s) with s = ``support`` or k, dtype of ``kernels``.

    Example:
        >>> u = torch.arange(27.0).reshape(3, 3, 3)
        >>> turned = rotate_kernels(u, torch.tensor([[math.pi / 2, 0.0, 0.0]]))[0]
        >>> torch.allclose(turned, torch.rot90(u, 1, dims=(-2, -1)), atol=1e-4)
        True
    """
    if kernels.ndim < 3 or len(set(kernels.shape[-3:])) != 1:
        raise ValueError(f"kernels must be (..., k, k, k) cubes; got shape {tuple(kernels.shape)}")
    if not kernels.is_floating_point():
        raise ValueError(f"kernels must be a floating-point tensor; got {kernels.dtype}")
    if support is not None:
        kernels = pad_kernels(kernels, support)
    size = kernels.shape[-1]
    if size % 2 == 0:
        raise ValueError(
            f"kernel size {size} is even: a rotation needs a central voxel. Pass support={size + 1} "
            "to zero-pad to an odd size (see pad_kernels for the trade-off)"
        )
    compute_dtype = kernels.dtype if kernels.dtype in (torch.float32, torch.float64) else torch.float32
    matrices, sources = _decompose(rotation.to(device=kernels.device, dtype=compute_dtype), size)
    rotated = kernels.to(compute_dtype).unsqueeze(0)
    for index, (shift_dim, coord_dim) in enumerate(_SHEARS):
        if index == _QUARTER_TURN_AT:
            flat = rotated.reshape(len(sources), -1, size**3)
            rotated = flat.gather(-1, sources.unsqueeze(1).expand_as(flat)).reshape(rotated.shape)
        rotated = apply_line_matrices(rotated, matrices[:, index], shift_dim, coord_dim)
    return rotated.to(kernels.dtype)


# The decomposition as a sequence, in the order applied: H about w, h, d; the quarter turn;
# S about d, h, w; each plane rotation (a, b) is shears along a, then b, then a.
_SHEARS = tuple(
    pair
    for axis in (2, 1, 0, 0, 1, 2)
    for pair in ((_PLANES[axis][0], _PLANES[axis][1]), (_PLANES[axis][1], _PLANES[axis][0]), _PLANES[axis])
)
_QUARTER_TURN_AT = 9


def _decompose(rotation: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 18 shears and the quarter turn of each rotation (see the module docstring).

    Returns:
        (R, 18, k, k, k) shift matrices per shear (line coordinate, out, in), in the order of
        :data:`_SHEARS`, and (R, k^3) flat source voxels of each rotation's quarter turn.
    """
    target = _as_quaternions(rotation)
    turns = _quarter_turn_quaternions().to(device=target.device, dtype=target.dtype)
    with torch.no_grad():
        nearest = (target @ turns.T).abs().argmax(dim=-1)
    turn = turns[nearest]
    residual = _quaternion_product(_conjugate(turn), target)
    residual = residual * torch.where(residual[:, :1] < 0, -1.0, 1.0)
    half = F.normalize(residual + torch.eye(1, 4, dtype=residual.dtype, device=residual.device), dim=-1)
    left = _quaternion_product(_quaternion_product(turn, half), _conjugate(turn))
    half_matrix, left_matrix = quaternion_to_matrix(torch.stack([half, left]))
    # H = R_d(a) R_h(b) R_w(c) exactly when H^T = R_w(-c) R_h(-b) R_d(-a): one Euler solver.
    angles = _euler_dhw(torch.cat([half_matrix.transpose(-1, -2), left_matrix]))
    half_angles, left_angles = -angles[: len(half)].flip(-1), angles[len(half) :]
    amounts = plane_rotation_amounts(torch.cat([half_angles, left_angles], dim=-1))
    return line_matrices(amounts, size).flatten(1, 2), _quarter_turn_sources(size, rotation.device)[nearest]


@functools.cache
def _dense_shear_layout(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each shear's line-matrix entries sit in its dense (k^3, k^3) matrix.

    Returns (18, k^3, k^3) indices into the flattened (k, k, k) line matrices and a 0/1
    mask: ``dense[X, Y] = lines[x_b, x_a, y_a]`` where X and Y agree off the shift axis a.
    """
    axis = torch.arange(size)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    out, into = grid[:, None, :], grid[None, :, :]  # X (rows) and Y (columns)
    indices, masks = [], []
    for shift_dim, coord_dim in _SHEARS:
        a, b = shift_dim + 3, coord_dim + 3
        indices.append((out[..., b] * size + out[..., a]) * size + into[..., a])
        masks.append(((out == into).sum(-1) - (out[..., a] == into[..., a]).long()) == 2)
    return torch.stack(indices).to(device), torch.stack(masks).to(device)


def _rotate_flat_small(vectors: torch.Tensor, rotation: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`rotate_kernels` of flattened small kernels, (M, k^3) -> (R, M, k^3), shears as matrices.

    Each shear of a k <= 5 kernel becomes one (k^3, k^3) matrix, all 18 built from their line
    matrices in one gather, each applied as one batched product: ~20 operations where the
    shear steps of :func:`rotate_kernels` take ~100, at sizes where the operation count is
    the cost (dispatch on a CPU, launches on a GPU).
    """
    lines, sources = _decompose(rotation, size)
    index, mask = _dense_shear_layout(size, rotation.device)
    shears = torch.arange(len(_SHEARS), device=rotation.device)[:, None, None]
    dense = lines.flatten(2)[:, shears, index] * mask  # (R, 18, k^3, k^3)
    vectors = vectors.expand(len(sources), *vectors.shape)
    for position, shear_matrix in enumerate(dense.unbind(1)):
        if position == _QUARTER_TURN_AT:
            vectors = vectors.gather(-1, sources[:, None, :].expand_as(vectors))
        vectors = vectors @ shear_matrix.transpose(-1, -2)
    return vectors


# rotation_operator turns the shears of kernels up to this size into matrices. At 7 the
# dense shears (18 x 343^2 per rotation) cost more than the shear steps they replace.
DENSE_UP_TO = 5


def _inverse(rotation: torch.Tensor) -> torch.Tensor:
    if rotation.shape[-1] == 3:
        return -rotation
    return torch.cat([rotation[..., :1], -rotation[..., 1:]], dim=-1)


def rotation_operator(
    rotation: torch.Tensor,
    kernel_size: int,
    *,
    central_plane: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The rotation as matrices: ``rotate_kernels(U, rotation)`` flattened == ``M @ U.flatten()``.

    A rotated kernel is linear in the kernel, so each rotation is a (k^3, k^3) matrix — or,
    for the 2D forward of Cross-D Conv, its (k^2, k^3) rows of the central plane d = k//2.
    M is orthogonal and ``rotate_kernels`` inverts exactly, so row p of M is the unit kernel
    e_p rotated by the inverse rotation: only the k^2 central-plane units are rotated for the
    2D operator. Agrees with :func:`rotate_kernels` to rounding and is differentiable in
    ``rotation``. Applying it is one matrix product over a whole kernel bank, far cheaper
    than shearing the bank itself.

    Args:
        rotation: (R, 3) axis-angle or (R, 4) quaternions, as in :func:`rotate_kernels`.
        kernel_size: odd k.
        central_plane: keep only the rows of the central (h, w) plane.
        dtype, device: of the result (``device`` defaults to that of ``rotation``).

    Returns:
        (R, k^3, k^3), or (R, k^2, k^3) with ``central_plane``.
    """
    device = rotation.device if device is None else torch.device(device)
    size = kernel_size
    central = slice(size**2 * (size // 2), size**2 * (size // 2 + 1)) if central_plane else slice(None)
    units = torch.eye(size**3, dtype=dtype, device=device)[central]
    if size <= DENSE_UP_TO and size % 2 == 1:
        return _rotate_flat_small(units, _inverse(rotation).to(device, dtype), size)
    return rotate_kernels(units.reshape(-1, size, size, size), _inverse(rotation)).flatten(2)
