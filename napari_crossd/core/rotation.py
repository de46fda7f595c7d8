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
near gimbal lock or the large shears of turns beyond 90 degrees. The eighteen shear
amounts have a closed form in the quaternion (:func:`_shear_amounts`), differentiated by
complex step; :mod:`napari_crossd.core.operator` multiplies the shears out into matrices.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from .fourier import apply_line_matrices, line_matrices

__all__ = [
    "axis_angle_to_matrix",
    "pad_kernels",
    "quaternion_to_matrix",
    "rotate_kernels",
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


# The plane turned by a positive rotation about d, h and w.
_PLANES = ((-2, -1), (-1, -3), (-3, -2))


def _check_rotation(rotation: torch.Tensor) -> None:
    if rotation.ndim != 2 or rotation.shape[-1] not in (3, 4):
        raise ValueError(
            "rotation must have shape (R, 3) (axis-angle, radians, (d, h, w) order) or (R, 4) "
            f"(unit quaternions, scalar first); got {tuple(rotation.shape)}"
        )


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
    _check_rotation(rotation)
    compute_dtype = kernels.dtype if kernels.dtype in (torch.float32, torch.float64) else torch.float32
    amounts, nearest = _ShearAmounts.apply(rotation.to(kernels.device))
    matrices = line_matrices(amounts.to(compute_dtype), size)
    sources = _turn_sources(size, kernels.device)[nearest]
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
# The Euler quantities, as quadratic forms of a quaternion (entries of its rotation matrix
# times n = |q|^2), then rho_d = hypot(R21, R22) and rho_w = hypot(R10, R00).
_TERMS = ("R21", "R22", "R10", "R00", "-R20", "n", "rho_d", "rho_w")
# Per plane angle phi = atan2(y, x) with rho = hypot(x, y): sin(phi) = y / rho and
# tan(phi / 2) = y / (rho + x); about h, sin = v / n and tan(phi / 2) = v / (n + rho_d).
_RATIOS = {  # name: (numerator, denominator terms)
    "tan_d": ("R21", ("rho_d", "R22")), "sin_d": ("R21", ("rho_d",)),
    "tan_h": ("-R20", ("n", "rho_d")), "sin_h": ("-R20", ("n",)),
    "tan_w": ("R10", ("rho_w", "R00")), "sin_w": ("R10", ("rho_w",)),
}


@functools.cache
def _amount_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(16, 36): the terms of H^T's and S's quaternions -> numerators and denominators of the 18 amounts.

    Each plane angle t gives the shears (-tan(t/2), sin t, -tan(t/2)); H's angles are the
    negated ones of H^T (whose quaternion is used), S's its own.
    """
    matrix = torch.zeros(2, len(_TERMS), 2, len(_SHEARS), dtype=torch.float64)
    column = 0
    for quaternion, sign, axes in ((0, -1.0, "whd"), (1, 1.0, "dhw")):
        for axis in axes:
            for kind, amount_sign in (("tan", -sign), ("sin", sign), ("tan", -sign)):
                numerator, denominator = _RATIOS[f"{kind}_{axis}"]
                matrix[quaternion, _TERMS.index(numerator), 0, column] = amount_sign
                for term in denominator:
                    matrix[quaternion, _TERMS.index(term), 1, column] = 1.0
                column += 1
    return matrix.reshape(2 * len(_TERMS), -1).to(device, dtype)


@functools.cache
def _euler_forms(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Constants of the decomposition: each Euler quantity is a quadratic form of (w, 2v, 1).

    The rotation's quaternion (w, v) comes as (w, 2v) (see :func:`_quaternion_coordinates`).
    For the 48 (quarter turn t, sign) pairs, the quaternions of H^T and S are linear in it:
    the residual is p = +-conj(t) q, its square root's direction is h = p + 1 (normalising
    is unnecessary: every shear amount is a ratio of forms of equal degree), H^T's
    quaternion is conj(h) and S's is t h conj(t). Rotation-matrix entries are quadratic
    forms of a quaternion, so of (w, 2v, 1).

    Returns:
        (48, 5): the 24 quarter-turn quaternions then their negatives, on (w, 2v, 1), whose
        largest product with the rotation picks the turn and the sign; (48, 25, 12) form
        coefficients on the flattened outer product of (w, 2v, 1) with itself.
    """
    turns = _quarter_turn_quaternions()
    coordinates = torch.diag(torch.tensor([1.0, 0.5, 0.5, 0.5, 1.0], dtype=torch.float64))[:4]  # (w, 2v, 1) -> q

    def left(q):  # the matrix of p -> q p (Hamilton product)
        w, x, y, z = q.tolist()
        return torch.tensor([[w, -x, -y, -z], [x, w, -z, y], [y, z, w, -x], [z, -y, x, w]], dtype=torch.float64)

    def right(q):  # p -> p q
        w, x, y, z = q.tolist()
        return torch.tensor([[w, -x, -y, -z], [x, w, z, -y], [y, -z, w, x], [z, y, -x, w]], dtype=torch.float64)

    conj = torch.diag(torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64))
    w, x, y, z = range(4)
    entries = {  # rotation-matrix entries times |q|^2 as quadratic forms
        "R21": [(y, z, 2), (w, x, 2)], "R22": [(w, w, 1), (x, x, -1), (y, y, -1), (z, z, 1)],
        "R10": [(x, y, 2), (w, z, 2)], "R00": [(w, w, 1), (x, x, 1), (y, y, -1), (z, z, -1)],
        "-R20": [(x, z, -2), (w, y, 2)], "n": [(w, w, 1), (x, x, 1), (y, y, 1), (z, z, 1)],
    }
    base = torch.zeros(len(entries), 4, 4, dtype=torch.float64)
    for index, name in enumerate(_TERMS[: len(entries)]):
        for i, j, value in entries[name]:
            base[index, i, j] = value
    shift = torch.eye(1, 4, dtype=torch.float64).T  # h = p + 1
    augmented = torch.cat([coordinates, torch.eye(5, dtype=torch.float64)[4:]])  # (w, 2v, 1) -> (q, 1)
    coefficients = []
    for sign in (1.0, -1.0):
        for turn in turns:
            residual = torch.cat([sign * left(conj @ turn), shift], dim=1) @ augmented
            quaternions = [conj @ residual, left(turn) @ right(conj @ turn) @ residual]  # H^T and S
            forms = torch.cat([torch.einsum("ai,fab,bj->ijf", m, base, m) for m in quaternions], dim=-1)
            coefficients.append(forms.reshape(25, -1))
    signed_turns = torch.cat([turns, -turns]) @ coordinates
    return signed_turns.to(device, dtype), torch.stack(coefficients).to(device, dtype)


@functools.cache
def _one(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones(1, 1, dtype=dtype, device=device)


def _quaternion_coordinates(rotation: torch.Tensor) -> torch.Tensor:
    """(N, 5) coordinates (w, 2v, 1) of the rotations' quaternions (w, v), analytic in ``rotation``.

    Analytic, so that complex-stepped input gives exact derivatives: axis-angle goes through
    the squared angle, of which cos(t/2) and sin(t/2)/t are even analytic functions (no norm,
    which is not analytic at 0 nor for complex input), and 2v = rotvec * sinc(t / (2 pi)).
    """
    one = _one(rotation.dtype, rotation.device).expand(len(rotation), 1)
    squared = torch.bmm(rotation[:, None, :], rotation[:, :, None])
    if rotation.shape[-1] == 4:
        scale = torch.tensor([1.0, 2.0, 2.0, 2.0], dtype=rotation.dtype, device=rotation.device)
        return torch.cat([rotation * (scale / squared[:, 0].sqrt()), one], dim=-1)
    angle = squared[:, 0].sqrt()
    return torch.cat([torch.cos(angle * 0.5), rotation * torch.sinc(angle * (0.5 / math.pi)), one], dim=-1)


def _shear_amounts(rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 18 shear amounts of each rotation, in :data:`_SHEARS` order, and its quarter turn.

    ``R = S Q H`` (module docstring) in closed form: the nearest quarter turn, then every
    amount as a ratio of quadratic forms of the quaternion and their hypotenuses (see
    :func:`_euler_forms`). Real or complex (for complex-step derivatives) ``rotation`` of
    shape (N, 3) or (N, 4).

    Returns:
        (N, 18) amounts in the dtype of ``rotation``; (N,) indices of the quarter turns into
        :func:`_turn_sources`.
    """
    coordinates = _quaternion_coordinates(rotation)
    turns, coefficients = _euler_forms(rotation.dtype, rotation.device)
    with torch.no_grad():  # the turn, and the sign that puts the residual near the identity
        choice = (coordinates @ turns.T).real.argmax(dim=-1)
    outer = coordinates[:, :, None] * coordinates[:, None, :]
    forms = torch.bmm(outer.view(len(rotation), 1, -1), coefficients[choice]).view(len(rotation), 2, -1)
    radii = forms[..., :4].unflatten(-1, (2, 2)).square().sum(-1).sqrt()  # rho_d, rho_w
    ratios = torch.cat([forms, radii], dim=-1).flatten(1) @ _amount_matrix(rotation.dtype, rotation.device)
    numerators, denominators = ratios.unflatten(-1, (2, -1)).unbind(-2)
    return numerators / denominators, choice


@functools.cache
def _turn_sources(size: int, device: torch.device) -> torch.Tensor:
    """(48, k^3) :func:`_quarter_turn_sources` of each choice of :func:`_shear_amounts` (turn, sign)."""
    return _quarter_turn_sources(size, device).repeat(2, 1)


# The imaginary step of complex-step derivatives: f(x + i h) = f(x) + i h f'(x) + O(h^2) with
# no subtraction, so the derivative is exact to float64 rounding for any small h.
COMPLEX_STEP = 1e-20


@functools.cache
def _complex_steps(components: int, device: torch.device) -> torch.Tensor:
    return torch.eye(components, dtype=torch.complex128, device=device) * (COMPLEX_STEP * 1j)


def _tangent_rotations(rotation: torch.Tensor) -> torch.Tensor:
    """(R, C) rotations -> (R * C, C) complex128 copies, copy j stepped by i h along component j."""
    steps = _complex_steps(rotation.shape[-1], rotation.device)
    return (rotation.to(torch.complex128)[:, None, :] + steps).flatten(0, 1)


class _ShearAmounts(torch.autograd.Function):
    """:func:`_shear_amounts` of real rotations with their Jacobian from one complex-step pass.

    The decomposition is ~25 small operations; autograd would record and replay all of
    them. Evaluating it once on the C complex-stepped copies of each rotation gives the
    amounts (real part) and their exact Jacobian (imaginary part / h) together, and the
    backward is one product.
    """

    @staticmethod
    def forward(ctx, rotation):
        _check_rotation(rotation)
        if not ctx.needs_input_grad[0]:
            amounts, nearest = _shear_amounts(rotation.to(torch.float64))
            return amounts.to(rotation.dtype), nearest
        components = rotation.shape[-1]
        stepped, nearest = _shear_amounts(_tangent_rotations(rotation))
        stepped = stepped.view(len(rotation), components, -1)
        ctx.save_for_backward((stepped.imag / COMPLEX_STEP).to(rotation.dtype))  # (R, C, 18)
        nearest = nearest[::components]
        ctx.mark_non_differentiable(nearest)
        return stepped[:, 0].real.to(rotation.dtype), nearest

    @staticmethod
    def backward(ctx, grad_amounts, _):
        (jacobian,) = ctx.saved_tensors
        return (jacobian @ grad_amounts[..., None])[..., 0]
