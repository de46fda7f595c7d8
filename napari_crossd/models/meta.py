"""What a network is, beside its weights: the ``crossd_meta`` record every model carries.

A model made by :func:`napari_crossd.models.build_model` gets a :class:`ModelMeta` as its
``crossd_meta`` attribute; loading, inflation and training build modified copies
(``dataclasses.replace``) and never change one in place. :func:`napari_crossd.io.save_model`
writes it as JSON (:meth:`ModelMeta.to_dict`) beside the weights and
:func:`napari_crossd.io.load_model` reads it back (:meth:`ModelMeta.from_dict`). The JSON is
the one earlier versions wrote and read: the same keys, and a key whose value is unset (None,
or a 2D network's ``spatial_dims``) is left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ModelMeta", "Normalization", "TrainingRecord", "model_meta"]


@dataclass(frozen=True)
class Normalization:
    """The per-channel ``(x - mean) / std`` the weights expect on images scaled to [0, 1]."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))


@dataclass(frozen=True)
class TrainingRecord:
    """Where pretrained weights come from: ``crossd pretrain``'s data and its last epoch's scores."""

    data: str
    epoch: int
    epochs: int
    image_size: int | None = None
    train_accuracy: float | None = None
    val_accuracy: float | None = None


@dataclass(frozen=True)
class ModelMeta:
    """The architecture, weight layout, input normalisation and 3D settings of a network.

    Attributes:
        arch: a name from :data:`napari_crossd.models.ARCHITECTURES`; None for a module that
            was inflated without coming from the registry.
        format: parameter layout of the weights: ``"torchvision"`` (plain convolutions),
            ``"crossd"`` (Cross-D layers built by this project) or ``"crossd_official"`` (a
            checkpoint from github.com/convergedmachine/Cross-D-Conv).
        num_classes: width of the classification head.
        normalization: what the weights expect on input.
        rotation, rotation_mode: Cross-D settings (``crossd_*`` architectures only).
        crossd_pointwise: the 1x1 convolutions are Cross-D too (the official layout; see
            :func:`napari_crossd.models.crossd.convert_to_crossd`'s ``pointwise``).
        strategy, official_shift, depth_preserving_stages: how the network was inflated
            (:func:`napari_crossd.models.inflate.inflate`); ``spatial_dims`` is 3 then.
        class_names: names of the head's outputs, in order.
        training: the pretraining run that made the weights.
        stored_dtype: the precision the weights file holds (``"float16"`` for shipped weights).
    """

    arch: str | None
    format: str = "torchvision"
    num_classes: int | None = None
    normalization: Normalization | None = None
    rotation: str | None = None
    rotation_mode: str | None = None
    crossd_pointwise: bool = False
    strategy: str | None = None
    official_shift: str | None = None
    depth_preserving_stages: int | None = None
    spatial_dims: int = 2
    class_names: tuple[str, ...] | None = None
    training: TrainingRecord | None = None
    stored_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    def inflation(self) -> dict[str, Any]:
        """The recorded :func:`~napari_crossd.models.inflate.inflate` arguments (none for a 2D network)."""
        settings = {"strategy": self.strategy, "official_shift": self.official_shift,
                    "depth_preserving_stages": self.depth_preserving_stages}
        return {name: value for name, value in settings.items() if value is not None}

    def to_dict(self) -> dict[str, Any]:
        """The JSON object :func:`napari_crossd.io.save_model` writes (see the module docstring)."""
        out: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None or value == _LEFT_OUT_AT.get(field.name, None):
                continue
            if isinstance(value, (Normalization, TrainingRecord)):
                value = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(value).items() if v is not None}
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeta:
        """Read :meth:`to_dict`'s object (or one an earlier version wrote).

        Raises:
            ValueError: keys this record does not have, or a missing ``arch``.
        """
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or "arch" not in data:
            problem = f"unknown keys {', '.join(unknown)}" if unknown else "no 'arch'"
            raise ValueError(f"not a napari-crossd model description: {problem}")
        values = dict(data)
        if values.get("normalization") is not None:
            values["normalization"] = Normalization(**values["normalization"])
        if values.get("training") is not None:
            values["training"] = TrainingRecord(**values["training"])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        return cls.from_dict(json.loads(text))


def model_meta(model: object) -> ModelMeta:
    """``model.crossd_meta``, or an empty record (``arch=None``, 2D) for a module without one."""
    return getattr(model, "crossd_meta", None) or ModelMeta(arch=None)


# Keys earlier versions never wrote at these values: left out, so their files stay the same.
_LEFT_OUT_AT = {"crossd_pointwise": False, "spatial_dims": 2}
