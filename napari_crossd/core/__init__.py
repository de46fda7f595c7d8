"""The Cross-D Conv operator and its exact Fourier kernel maths. Pure torch."""

from .crossd_conv import CrossDConv
from .fourier import fourier_shift, rotate_plane, shear
from .operator import rotation_operator, static_kernels
from .reference import first_order_rotation, reference_operator
from .rotation import axis_angle_to_matrix, pad_kernels, quaternion_to_matrix, rotate_kernels

__all__ = [
    "CrossDConv",
    "axis_angle_to_matrix",
    "first_order_rotation",
    "fourier_shift",
    "pad_kernels",
    "quaternion_to_matrix",
    "reference_operator",
    "rotate_kernels",
    "rotate_plane",
    "rotation_operator",
    "shear",
    "static_kernels",
]
