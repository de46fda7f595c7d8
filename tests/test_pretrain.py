"""crossd pretrain: data sets, and DistributedDataParallel training under torchrun with exact resume.

The DDP test trains a Cross-D MobileNetV2 on real photographs (scikit-image's brick,
grass and gravel textures, shipped with scikit-image: CI needs nothing extra) with two
CPU processes (gloo), and checks that the replicas agree and that a run interrupted
after one epoch and resumed ends with the uninterrupted run's parameters.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_crossd.io import load_model
from napari_crossd.io.samples import FASHION_MNIST_ROOT
from napari_crossd.models import build_model
from napari_crossd.training import (
    FashionMNIST,
    ImageFolder,
    PretrainConfig,
    VolumeSlices,
    load_checkpoint,
    pretrain,
    read_idx,
)

TEXTURES = ("brick", "grass", "gravel")


@pytest.fixture(scope="module")
def texture_folder(tmp_path_factory) -> Path:
    """24 real 64x64 grey photo crops, 8 per texture class, as PNG files in one folder per class."""
    from skimage import data, io

    root = tmp_path_factory.mktemp("textures")
    for name in TEXTURES:
        image = getattr(data, name)()
        (root / name).mkdir()
        for i in range(8):
            y, x = (i // 4) * 128, (i % 4) * 128
            io.imsave(root / name / f"{i}.png", image[y : y + 64, x : x + 64], check_contrast=False)
    return root


def _torchrun(args: list[str], out: Path, timeout: float = 600) -> str:
    """Run ``crossd pretrain`` on two CPU processes; returns what they printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "napari_crossd.cli", "pretrain", *args, "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_torchrun_ddp_replicas_agree_and_resume_is_exact(texture_folder, tmp_path):
    common = [str(texture_folder), "--arch", "mobilenet_v2", "--conv", "crossd", "--rotation", "dynamic",
              "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--device", "cpu", "--save-every-rank"]
    full, parted = tmp_path / "full", tmp_path / "parted"
    _torchrun(common, full)
    _torchrun([*common, "--stop-after", "1"], parted)
    assert sorted(p.name for p in parted.glob("epoch_*.pt")) == ["epoch_0001.pt"]
    _torchrun([*common, "--resume", str(parted)], parted)

    # Both ranks hold the same parameters and buffers.
    rank0, rank1 = load_file(full / "rank0.safetensors"), load_file(full / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=1e-7, msg=key)

    # Training moved the weights from their initialisation (seed 0; 3 steps per epoch, 6 in all)...
    torch.manual_seed(0)
    init = build_model("crossd_mobilenet_v2", 3, rotation="dynamic").state_dict()
    moved = [key for key in init if init[key].is_floating_point() and not torch.allclose(init[key], rank0[key])]
    assert len(moved) > 0.9 * sum(v.is_floating_point() for v in init.values())

    # ... and the resumed run ends where the uninterrupted one does, on both ranks.
    for rank in (0, 1):
        resumed = load_file(parted / f"rank{rank}.safetensors")
        for key in rank0:
            torch.testing.assert_close(resumed[key], rank0[key], rtol=0, atol=1e-6, msg=key)
    log_full, log_parted = _log(full), _log(parted)
    assert [e["step"] for e in log_parted] == [3, 6]
    for a, b in zip(log_full, log_parted, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["replica_max_abs_diff"] == 0.0 and b["replica_max_abs_diff"] == 0.0
        assert a["processes"] == 2

    # The checkpoint reads with weights_only=True and holds every rank's RNG state.
    state = load_checkpoint(full)
    assert state["epoch"] == 2 and state["step"] == 6
    assert state["rng"]["torch"].shape[0] == 2
    assert not torch.equal(state["rng"]["torch"][0], state["rng"]["torch"][1])
    saved = load_model(full / "model.safetensors")
    assert saved.crossd_meta.arch == "crossd_mobilenet_v2"
    assert saved.crossd_meta.rotation_mode == "fourier"
    assert saved.crossd_meta.class_names == tuple(TEXTURES)
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(value, rank0[key], rtol=0, atol=0, msg=key)


def test_single_process_resume_with_changed_settings_is_refused(texture_folder, tmp_path):
    config = PretrainConfig(str(texture_folder), str(tmp_path), arch="mobilenet_v2", conv="plain", epochs=1,
                            batch_size=12, image_size=32, device="cpu")
    history = pretrain(config)
    assert len(history) == 1 and history[0]["step"] == 2
    changed = PretrainConfig(str(texture_folder), str(tmp_path), arch="mobilenet_v2", conv="crossd", epochs=2,
                             batch_size=12, image_size=32, device="cpu")
    with pytest.raises(ValueError, match="conv: saved 'plain', now 'crossd'"):
        pretrain(changed, resume=tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"arch": "crossd_resnet18"}, "arch must be one of"), ({"conv": "fancy"}, "conv must be"),
     ({"epochs": 0}, "epochs must be at least 1"), ({"rotation": "wobble"}, "rotation must be")],
)
def test_config_rejects_bad_settings(change, message, tmp_path):
    config = PretrainConfig("fashion-mnist", str(tmp_path), **change)
    with pytest.raises(ValueError, match=message):
        pretrain(config)


def test_small_folder_trains_with_the_batch_that_fits(texture_folder, tmp_path):
    """24 images under the default batch of 128 on two processes: one step of 12 per process per epoch."""
    out = tmp_path / "small"
    printed = _torchrun([str(texture_folder), "--arch", "mobilenet_v2", "--conv", "plain", "--epochs", "2",
                         "--image-size", "32", "--device", "cpu"], out)
    assert printed.count("fewer than one batch of 128") == 1  # said once, by rank 0, not per epoch
    assert "training with batch 24 (12 per process), one step per epoch" in printed
    log = _log(out)
    assert [e["step"] for e in log] == [1, 2]
    assert all(e["processes"] == 2 and e["replica_max_abs_diff"] == 0.0 for e in log)
    state = load_checkpoint(out)
    assert state["config"]["batch_size"] == 128 and state["config"]["lr"] == PretrainConfig("", "").lr


def test_compiled_training_matches_eager(texture_folder, tmp_path, monkeypatch):
    """--compile captures the whole step (dynamo and AOTAutograd) and trains to the same numbers.

    The capture is checked with the aot_eager backend, which runs the captured graphs with
    eager kernels: bit for bit the eager run. Inductor's generated CPU kernels (the real
    backend) reorder floating-point sums, which after two SGD steps of a MobileNetV2 moves
    weights visibly (also for plain convolutions), so it cannot be held to equality.
    """
    real_compile, captured = torch.compile, []

    def aot_eager(model, **options):
        captured.append(options)
        return real_compile(model, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager)
    settings = {"arch": "mobilenet_v2", "conv": "crossd", "rotation": "static", "epochs": 1, "batch_size": 12,
                "image_size": 32, "device": "cpu", "augment": False}
    eager = pretrain(PretrainConfig(str(texture_folder), str(tmp_path / "eager"), **settings))
    assert not captured
    compiled = pretrain(PretrainConfig(str(texture_folder), str(tmp_path / "compiled"), compile=True, **settings))
    assert captured == [{"dynamic": False}]
    assert compiled[0]["train_loss"] == eager[0]["train_loss"]
    a, b = load_file(tmp_path / "eager" / "model.safetensors"), load_file(tmp_path / "compiled" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_image_folder_reads_real_photos(texture_folder):
    dataset = ImageFolder(texture_folder, image_size=48)
    assert dataset.classes == list(TEXTURES) and len(dataset) == 24
    image, label = dataset[9]
    assert image.shape == (3, 48, 48) and label == 1
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    torch.testing.assert_close(image[0], image[2])  # grey photo repeated over channels


def test_augmentation_depends_on_seed_epoch_index_only(texture_folder):
    a = ImageFolder(texture_folder, image_size=32, augment=True, seed=3)
    b = ImageFolder(texture_folder, image_size=32, augment=True, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    torch.testing.assert_close(a[5][0], b[5][0], rtol=0, atol=0)
    b.set_epoch(2)
    assert any(not torch.equal(a[i][0], b[i][0]) for i in range(8))


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="has no class folders"):
        ImageFolder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        ImageFolder(tmp_path)


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    from skimage import data

    images = np.stack([data.camera()[:28, :28], data.moon()[:28, :28]])
    path = tmp_path / "x-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", *images.shape) + images.tobytes())
    np.testing.assert_array_equal(read_idx(path), images)
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="is not an idx file"):
        read_idx(bad)
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match=r"declares shape \(10,\)"):
        read_idx(short)


@pytest.mark.skipif(not (FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_test_split_and_stratified_subset():
    test = FashionMNIST(split="test")
    assert len(test) == 10_000 and np.bincount(test.targets).tolist() == [1000] * 10
    image, _ = test[0]
    assert image.shape == (3, 28, 28)
    subset = FashionMNIST(split="test", limit=500, seed=1)
    assert len(subset) == 500 and np.bincount(subset.targets).tolist() == [50] * 10


def test_volume_slices_from_real_mri(tmp_path):
    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        pytest.skip('nilearn is not installed: pip install "napari-crossd[samples]"')
    folder = Path(spec.origin).parent / "datasets" / "data"
    listing = tmp_path / "volumes.csv"
    listing.write_text(
        "path,label\n"
        f"{folder / 'mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz'},t1\n"
        f"{folder / 'mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz'},grey_matter\n"
    )
    dataset = VolumeSlices(listing, axes=(0,), step=8, image_size=32)
    assert dataset.classes == ["grey_matter", "t1"]
    assert set(dataset.targets) == {0, 1}
    # Nearly empty slices (outside the head) are dropped: fewer than 197 / 8 per volume.
    assert 0 < dataset.targets.count(1) < 25
    image, _ = dataset[0]
    assert image.shape == (3, 32, 32)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.nii.gz,a\n")
    with pytest.raises(ValueError, match="header 'path,label'"):
        VolumeSlices(bad)


def test_shipped_crossd_default_weights(mni_t1):
    from napari_crossd.io.checkpoints import DEFAULT_WEIGHTS
    from napari_crossd.models.inflate import inflate

    assert DEFAULT_WEIGHTS.stat().st_size <= 10_000_000
    model = load_model("default")
    meta = model.crossd_meta
    assert (meta.arch, meta.rotation, meta.rotation_mode) == ("crossd_mobilenet_v2", "dynamic", "fourier")
    assert meta.class_names[0] == "T-shirt/top" and meta.stored_dtype == "float16"
    # The Cross-D kernels become the 3D network's kernels; features of a real MRI crop are finite.
    model3d = inflate(model)
    volume = ((mni_t1 - meta.normalization.mean[0]) / meta.normalization.std[0]).float()
    with torch.no_grad():
        features = model3d.forward_features(volume[None, None].expand(1, 3, -1, -1, -1))
    assert features[0].shape[:2] == (1, 16) and all(torch.isfinite(f).all() for f in features)


@pytest.mark.skipif(not (FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="apt-get install dataset-fashion-mnist")
def test_shipped_weights_reach_their_recorded_accuracy():
    from napari_crossd.training import evaluate

    model = load_model("default")
    recorded = model.crossd_meta.training.val_accuracy  # full 10,000-image test split, float32
    # 2,000 test images (class-stratified): binomial std ~0.9 points at 77 %.
    assert evaluate(model, limit=2000) == pytest.approx(recorded, abs=0.03)
