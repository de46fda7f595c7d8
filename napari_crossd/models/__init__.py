"""Backbones with torchvision-compatible parameter names, their Cross-D variants, and 2D->3D inflation."""

from .crossd import convert_to_crossd, crossd_from_conv2d
from .meta import ModelMeta, Normalization, TrainingRecord
from .mobilenet import MobileNetV2, mobilenet_v2
from .registry import (
    ARCHITECTURES,
    IMAGENET_NORMALIZATION,
    RADIMAGENET_NORMALIZATION,
    build_model,
    head_name,
    list_models,
)
from .resnet import ResNet, resnet18, resnet34, resnet50

__all__ = [
    "ARCHITECTURES",
    "IMAGENET_NORMALIZATION",
    "RADIMAGENET_NORMALIZATION",
    "MobileNetV2",
    "ModelMeta",
    "Normalization",
    "ResNet",
    "TrainingRecord",
    "build_model",
    "convert_to_crossd",
    "crossd_from_conv2d",
    "head_name",
    "list_models",
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "resnet50",
]
