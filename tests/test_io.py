"""Checkpoint I/O: real ImageNet weights, nesting/prefix variants, official Cross-D
checkpoints, safetensors round trips, helpful errors and refusal of malicious pickles."""

from __future__ import annotations

import argparse
import builtins
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official_crossd import OFFICIAL_DROPPED_WORDS, OFFICIAL_RESNETS, official_checkpoint, official_crossd_resnet
from skimage import data

from napari_crossd.io import (
    UnsafeCheckpointError,
    detect_architecture,
    load_model,
    load_model_with_report,
    load_state_dict_file,
    save_model,
    strip_prefixes,
)
from napari_crossd.io.detect import OFFICIAL_EXTRA_WORDS
from napari_crossd.models import build_model
from napari_crossd.models.inflate import inflate

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_ESPRESSO = 967


def imagenet_preprocess(image: np.ndarray) -> torch.Tensor:
    """torchvision's eval transform: shorter side to 256 (antialiased), centre crop 224, normalise.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``(1, 3, 224, 224)`` float tensor.
    """
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    size = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
    x = x[..., top : top + 224, left : left + 224]
    return (x - IMAGENET_MEAN) / IMAGENET_STD


# --- real weights -----------------------------------------------------------------


def test_imagenet_mobilenet_v2_loads_and_classifies(mobilenet_v2_imagenet_path):
    model = load_model(mobilenet_v2_imagenet_path)
    assert not model.training
    assert model.crossd_meta.arch == "mobilenet_v2"
    assert model.crossd_meta.format == "torchvision"
    assert model.crossd_meta.num_classes == 1000
    assert model.crossd_meta.normalization.name == "imagenet"
    images = torch.cat([imagenet_preprocess(data.chelsea()), imagenet_preprocess(data.coffee())])
    with torch.no_grad():
        probs = model(images).softmax(dim=1)
    cat, coffee = probs.argmax(dim=1).tolist()
    # Measured: chelsea -> 285 (Egyptian cat) p=0.72, coffee -> 967 (espresso) p=0.99.
    assert cat in IMAGENET_CATS
    assert probs[0, IMAGENET_CATS].sum() > 0.9
    assert coffee == IMAGENET_ESPRESSO
    assert probs[1, IMAGENET_ESPRESSO] > 0.9


def test_imagenet_weights_survive_safetensors_round_trip(mobilenet_v2_imagenet_path, tmp_path):
    original = load_model(mobilenet_v2_imagenet_path)
    written = save_model(original, tmp_path / "mnv2")
    assert [p.name for p in written] == ["mnv2.safetensors", "mnv2.json"]
    reloaded = load_model(written[0])
    for key, value in original.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert reloaded.crossd_meta.normalization == original.crossd_meta.normalization


# --- layouts and detection --------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {"model": {f"model.{k}": v for k, v in sd.items()}, "optimizer": {}},
        lambda sd: {"net": {f"module.backbone.{k}": v for k, v in sd.items()}},
        lambda sd: {"checkpoint": 1, "model_state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "lightning+ddp", "torchvision-train", "nested-prefixes", "compiled"],
)
def test_nesting_and_prefix_variants_load(wrap, tmp_path):
    source = build_model("resnet18", num_classes=10).eval()
    path = tmp_path / "weights.pth"
    torch.save(wrap(source.state_dict()), path)
    model = load_model(path)
    assert model.crossd_meta.arch == "resnet18"
    assert model.crossd_meta.num_classes == 10
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_prefix_shared_by_only_some_keys_is_kept():
    state = {"model.a": torch.zeros(1), "head.b": torch.zeros(1)}
    assert strip_prefixes(state).keys() == state.keys()


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "crossd_resnet34"])
def test_detects_every_architecture_and_its_head(arch):
    with torch.device("meta"):
        state = build_model(arch, num_classes=37).state_dict()
    match = detect_architecture(state)
    assert (match.arch, match.num_classes) == (arch, 37)


def test_torchvision_checkpoint_without_num_batches_tracked_loads(tmp_path):
    # torchvision's original resnet18-5c106cde.pth predates BatchNorm's step counter.
    source = build_model("resnet18").state_dict()
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in source.items() if "num_batches_tracked" not in k}, path)
    assert load_model(path).crossd_meta.arch == "resnet18"


def test_official_crossd_checkpoint_loads_with_weights_only(tmp_path):
    # Written like the official training script (torchvision reference train.py):
    # a dict of model, optimizer, lr_scheduler, epoch and the argparse arguments.
    source = build_model("crossd_resnet18", num_classes=165, rotation_mode="reference")
    optimizer = torch.optim.SGD(source.parameters(), lr=1e-4, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[30, 60])
    source(torch.randn(2, 3, 32, 32)).logsumexp(dim=1).mean().backward()
    optimizer.step()
    scheduler.step()
    args = argparse.Namespace(model="resnet18", rot=True, lr=0.1, data_path="/radimagenet")
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "model": source.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 89,
            "args": args,
        },
        path,
    )

    model = load_model(path)
    meta = model.crossd_meta
    assert meta.arch == "crossd_resnet18"
    assert meta.format == "crossd_official"
    assert (meta.rotation, meta.rotation_mode) == ("dynamic", "reference")
    assert meta.num_classes == 165
    assert meta.normalization.name == "radimagenet"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.eval()(x))


@pytest.fixture(scope="module")
def official_r18() -> dict:
    """An official Cross-D ResNet-18 (7 classes) whose BatchNorm statistics moved (in the
    rotation heads too), its state dict, and its output on ``x`` (the official forward is slow)."""
    torch.manual_seed(0)
    model = official_crossd_resnet("crossd_resnet18", num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 32, 32))
        logits = model.eval()(x)
    return {"state": model.state_dict(), "x": x, "logits": logits}


def _save_official(official: dict, path: Path, extras: dict | None = None) -> Path:
    torch.save(official_checkpoint(official["state"], extras), path)
    return path


def test_official_crossd_resnet18_has_the_layout_the_issue_describes():
    state = official_crossd_resnet("crossd_resnet18").state_dict()
    assert len(state) == 302
    assert tuple(state["layer2.0.downsample.0.weights_3d"].shape) == (128, 64, 1, 1, 1)
    assert tuple(state["layer2.0.downsample.0.rotation_params.0.weight"].shape) == (16, 64, 1, 1)


@pytest.mark.parametrize("arch", list(OFFICIAL_RESNETS))
def test_official_layout_is_detected_for_every_resnet_depth(arch):
    with torch.device("meta"):
        state = official_crossd_resnet(arch, num_classes=5).state_dict()
    match = detect_architecture(state)
    assert (match.arch, match.num_classes, match.rotation, match.pointwise) == (arch, 5, "dynamic", True)
    assert match.diff.exact and not match.diff.ignored


def test_official_resnet18_checkpoint_loads_and_computes_the_official_network(official_r18, tmp_path):
    path = _save_official(official_r18, tmp_path / "CrossDConvR18.pth")
    model, report = load_model_with_report(path)
    meta = model.crossd_meta
    assert (meta.arch, meta.format, meta.crossd_pointwise) == ("crossd_resnet18", "crossd_official", True)
    assert (meta.rotation, meta.rotation_mode, meta.num_classes) == ("dynamic", "reference", 7)
    assert (len(report.loaded), report.missing, report.ignored) == (302, (), ())
    with torch.no_grad():
        torch.testing.assert_close(model(official_r18["x"]), official_r18["logits"])


@pytest.mark.parametrize("arch", ["crossd_resnet34", "crossd_resnet50"])
def test_official_deeper_resnet_checkpoints_load_every_tensor(arch, tmp_path):
    official = official_crossd_resnet(arch, num_classes=3)
    path = tmp_path / "official.pth"
    torch.save(official_checkpoint(official.state_dict()), path)
    model, report = load_model_with_report(path)
    assert model.crossd_meta.arch == arch
    assert report.loaded == tuple(official.state_dict())
    for key, value in official.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_tensors_the_official_evaluation_drops_are_ignored_and_reported(official_r18, tmp_path):
    assert OFFICIAL_EXTRA_WORDS == OFFICIAL_DROPPED_WORDS
    extras = {
        "layer1.0.dilated_conv.weight": torch.randn(64, 64, 3, 3),
        "layer1.0.bn_dilated.running_mean": torch.zeros(64),
        "layer1.0.bn_dilated.num_batches_tracked": torch.tensor(3),
        "conv1.angle": torch.zeros(1),
        "layer4.1.conv2.rotation_axis": torch.zeros(3),
    }
    path = _save_official(official_r18, tmp_path / "released.pth", extras)
    model, report = load_model_with_report(path)
    assert sorted(report.ignored) == sorted(extras)
    assert len(report.loaded) == 302 and not report.missing
    assert "302 tensors loaded: 0 missing, 5 unexpected (ignored: layer1.0.dilated_conv.weight" in report.summary()
    with torch.no_grad():
        torch.testing.assert_close(model(official_r18["x"]), official_r18["logits"])

    # Words the official evaluation does not drop still refuse the file.
    _save_official(official_r18, path, {"decoder.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\): decoder\.0\.weight"):
        load_model(path)


def test_official_checkpoint_inflates_as_the_official_3d_pipeline_loads_it(official_r18, tmp_path):
    # The official evaluation builds torchvision's resnet18, converts it to Conv3d and loads
    # the checkpoint after dropping rotation keys and renaming weights_3d to weight: every
    # Cross-D layer, the 1x1 shortcuts included, is its U as a Conv3d kernel.
    model3d = inflate(load_model(_save_official(official_r18, tmp_path / "official.pth")), "i3d")
    shortcut = model3d.layer2[0].downsample[0]
    assert isinstance(shortcut, torch.nn.Conv3d) and shortcut.kernel_size == (1, 1, 1)
    assert shortcut.stride == (2, 2, 2) and shortcut.padding == (0, 0, 0)
    expected = {
        key.replace(".weights_3d", ".weight"): value
        for key, value in official_r18["state"].items()
        if not any(word in key for word in OFFICIAL_DROPPED_WORDS)
    }
    state3d = model3d.state_dict()
    assert state3d.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state3d[key], value), key
    assert model3d(torch.randn(1, 3, 8, 32, 32)).shape == (1, 7)


def test_official_layout_round_trips_through_save_model(official_r18, tmp_path):
    loaded = load_model(_save_official(official_r18, tmp_path / "official.pth"))
    weights, sidecar = save_model(loaded, tmp_path / "ours.safetensors")
    assert json.loads(sidecar.read_text())["crossd_pointwise"] is True
    with torch.no_grad():
        torch.testing.assert_close(load_model(weights)(official_r18["x"]), official_r18["logits"])


def test_load_report_names_what_was_not_copied(tmp_path):
    source = build_model("resnet18").state_dict()
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in source.items() if "num_batches_tracked" not in k}, path)
    _, report = load_model_with_report(path)
    assert len(report.missing) == 20 and all(k.endswith("num_batches_tracked") for k in report.missing)
    assert len(report.loaded) == len(source) - 20 and not report.ignored
    assert report.summary() == f"{len(source) - 20} tensors loaded: 20 missing, 0 unexpected"


def test_unknown_network_names_missing_unexpected_keys_and_closest(tmp_path):
    state = {k: v for k, v in build_model("resnet18").state_dict().items() if "layer4" not in k}
    state |= {"decoder.0.weight": torch.zeros(8, 8, 3, 3), "decoder.0.bias": torch.zeros(8)}
    path = tmp_path / "unet.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_model(path)
    message = str(info.value)
    assert "Closest: resnet18" in message
    assert "missing key(s): layer4.0.conv1.weight" in message
    assert "2 unexpected key(s): decoder.0.weight, decoder.0.bias" in message


def test_requested_architecture_that_does_not_fit(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_model("resnet18").state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit resnet34: \d+ missing key\(s\): layer1\.2"):
        load_model(path, arch="resnet34")


# --- our own format ----------------------------------------------------------------


def test_crossd_model_round_trips_with_settings_and_class_names(tmp_path):
    source = build_model("crossd_resnet18", num_classes=3, rotation="static").eval()
    with torch.no_grad():
        source.conv1.rotation_vector.fill_(0.3)
    weights, sidecar = save_model(source, tmp_path / "ours.safetensors", class_names=["a", "b", "c"])
    meta = json.loads(sidecar.read_text())
    assert meta["arch"] == "crossd_resnet18"
    assert (meta["rotation"], meta["rotation_mode"]) == ("static", "fourier")
    assert meta["class_names"] == ["a", "b", "c"]

    model = load_model(weights)
    assert model.crossd_meta.class_names == ("a", "b", "c")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))

    # The same metadata is in the safetensors header: the weights file alone suffices.
    sidecar.unlink()
    assert load_model(weights).crossd_meta.rotation == "static"


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("resnet18", {"strategy": "i3d"}),
        ("crossd_resnet18", {"strategy": "centre", "official_shift": "undo", "depth_preserving_stages": 1}),
    ],
)
def test_inflated_model_round_trips(arch, options, tmp_path):
    rotation = {"rotation_mode": "reference"} if arch.startswith("crossd_") else {}
    source = inflate(build_model(arch, num_classes=2, **rotation), **options).eval()
    weights, sidecar = save_model(source, tmp_path / "net3d.safetensors")
    saved = json.loads(sidecar.read_text())
    assert saved["spatial_dims"] == 3
    assert {k: saved[k] for k in options} == options

    model = load_model(weights)
    assert {k: getattr(model.crossd_meta, k) for k in options} == options
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_save_model_errors(tmp_path):
    with pytest.raises(ValueError, match="crossd_meta"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"writes \.safetensors files"):
        save_model(build_model("resnet18"), tmp_path / "x.pth")
    with pytest.raises(ValueError, match="2 class names for a head with 1000 outputs"):
        save_model(build_model("resnet18"), tmp_path / "x", class_names=["a", "b"])


# --- bad and hostile files ---------------------------------------------------------


class _ShellPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_ShellPayload, _ExecPayload])
@pytest.mark.parametrize("writer", ["torch.save", "pickle-protocol-2"])
def test_malicious_pickle_is_refused_without_running(payload, writer, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"model": {"conv1.weight": torch.zeros(1)}, "args": payload(marker)}, path)
    else:
        with path.open("wb") as f:
            pickle.dump({"epoch": 1, "args": payload(marker)}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match=r"Refused to load .*'(posix\.system|exec)'"):
        load_model(path)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict_file(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_raw_pickle_with_unsupported_opcodes_is_refused_without_running(tmp_path):
    # Protocol 4+ frames are not implemented by torch's safe unpickler: refused unread.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"model": _ShellPayload(marker)}, f, protocol=5)
    with pytest.raises(ValueError, match=r"not a readable PyTorch checkpoint: safe \(weights-only\)") as info:
        load_model(path)
    assert "weights_only=False" not in str(info.value)
    assert not marker.exists()


def test_missing_unsupported_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ValueError, match=r"Unsupported checkpoint type 'w\.h5'"):
        load_state_dict_file(tmp_path / "w.h5")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_state_dict_file(tmp_path / "broken.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_state_dict_file(tmp_path / "broken.safetensors")
    torch.save({"epoch": 3, "best_acc": 0.5}, tmp_path / "meta_only.pth")
    with pytest.raises(ValueError, match=r"holds no state dict.*found keys 'epoch', 'best_acc'"):
        load_state_dict_file(tmp_path / "meta_only.pth")


def test_failed_save_leaves_the_earlier_model_whole(tmp_path, monkeypatch):
    model = build_model("resnet18", num_classes=3)
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    before = path.read_bytes(), path.with_suffix(".json").read_text()
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def broken_write_text(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken_write_text)
    with pytest.raises(OSError, match="disk full"):
        save_model(build_model("resnet18", num_classes=3), path)
    assert (path.read_bytes(), path.with_suffix(".json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
