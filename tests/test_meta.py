"""The model metadata record (napari_crossd.models.meta): typed, frozen, and the JSON it reads and writes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from napari_crossd.io.checkpoints import DEFAULT_WEIGHTS
from napari_crossd.models import ModelMeta, Normalization, TrainingRecord


def test_the_shipped_sidecar_reads_and_writes_back_unchanged():
    written = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    meta = ModelMeta.from_dict(written)
    assert meta.training.val_accuracy == written["training"]["val_accuracy"]
    assert meta.normalization.mean == tuple(written["normalization"]["mean"])
    assert meta.to_dict() == written


def test_every_field_round_trips_through_json():
    meta = ModelMeta(
        "crossd_resnet18", format="crossd_official", num_classes=3,
        normalization=Normalization("radimagenet", [0.3] * 3, [0.2] * 3), rotation="dynamic",
        rotation_mode="reference", crossd_pointwise=True, strategy="centre", official_shift="undo",
        depth_preserving_stages=0, spatial_dims=3, class_names=["a", "b", "c"],
        training=TrainingRecord("fashion-mnist", 2, 3, image_size=28, val_accuracy=0.5), stored_dtype="float16",
    )
    assert ModelMeta.from_json(meta.to_json()) == meta
    assert meta.class_names == ("a", "b", "c") and meta.inflation() == {
        "strategy": "centre", "official_shift": "undo", "depth_preserving_stages": 0}


def test_unset_fields_are_left_out_as_earlier_versions_wrote_them():
    assert ModelMeta("resnet18").to_dict() == {"arch": "resnet18", "format": "torchvision"}
    assert ModelMeta("resnet18").inflation() == {}


def test_records_are_frozen_and_refuse_unknown_keys():
    meta = ModelMeta("resnet18")
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.arch = "resnet50"
    with pytest.raises(ValueError, match="unknown keys colour"):
        ModelMeta.from_dict({"arch": "resnet18", "colour": "red"})
    with pytest.raises(ValueError, match="no 'arch'"):
        ModelMeta.from_dict({"format": "torchvision"})
