"""The Cross-D Conv operator and its exact Fourier kernel maths. Pure torch."""

from .fourier import fourier_shift, rotate_plane, shear
from .rotation import (
    axis_angle_to_matrix,
    pad_kernels,
    quaternion_to_matrix,
    rotate_kernels,
    rotation_operator,
)

__all__ = [
    "axis_angle_to_matrix",
    "fourier_shift",
    "pad_kernels",
    "quaternion_to_matrix",
    "rotate_kernels",
    "rotate_plane",
    "rotation_operator",
    "shear",
]
