"""The volume engine on real data: tiling, dask, normalisation, fine-tuning, cancellation, saving."""

from __future__ import annotations

import copy

import dask.array as da
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_crossd import build_model
from napari_crossd.datasets import dice_scores, paint_strokes
from napari_crossd.engine import (
    Progress,
    Segmenter,
    extract_features,
    features_job,
    finetune,
    finetune_job,
    intensity_stats,
    load_segmenter,
    pca_rgb,
    resolve_device,
    run_job,
    save_segmenter,
    segment,
)
from napari_crossd.engine.normalize import network_input, unit_intensity
from napari_crossd.engine.pyramid import Pyramid, encode_job, smoothed_copies, spacing_scale


@pytest.fixture(scope="module")
def brain(mni_sample):
    """A 48 x 96 x 96 real T1 block from the middle of the brain, with its tissue labels."""
    region = (slice(60, 108), slice(60, 156), slice(46, 142))
    return mni_sample.image[region], mni_sample.labels[region]


# --- devices and normalisation -------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type in (expected, "mps")
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_presets_on_real_volume(brain):
    image, _ = brain
    micro = intensity_stats(image, "microscopy")
    assert (micro.low, micro.high) == tuple(np.percentile(image, [1, 99.8]))
    unit = unit_intensity(image, micro)
    assert float(unit.min()) == 0.0 and float(unit.max()) == 1.0
    assert intensity_stats(image, "checkpoint").high == 255.0  # uint8: divided by 255
    mr = unit_intensity(image, intensity_stats(image, "mr"))
    assert abs(float(mr.mean())) < 1e-3 and abs(float(mr.std()) - 1) < 1e-3
    hu = image.astype(np.int16) * 8 - 1024  # the same anatomy in a CT-like range
    ct = intensity_stats(hu, "auto")
    assert (ct.preset, ct.low, ct.high) == ("ct", -1000.0, 1000.0)
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    x = network_input(unit, micro, imagenet, 3)
    assert x.shape == (3, *image.shape)
    torch.testing.assert_close(x[1], (unit - 0.456) / 0.224)


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        (np.zeros((8, 8)), r"Expected a 3D volume \(Z, Y, X\), got shape \(8, 8\)"),
        (np.zeros((8, 8, 8, 3)), r"RGB\(A\) volume, shape \(8, 8, 8, 3\)"),
        (np.array([[[1.0, np.nan], [np.inf, 2.0]]]), "contains 1 NaN and 1 infinite voxels"),
        (np.zeros((4, 4, 4), dtype=complex), "real-valued"),
    ],
)
def test_bad_volumes_are_refused(imagenet_3d, volume, message):
    with pytest.raises(ValueError, match=message):
        extract_features(imagenet_3d, volume, device="cpu")


def test_dask_nan_is_refused(imagenet_3d):
    # Caught by the statistics pass when it sees the voxel, else when its block loads.
    volume = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    volume[12, 3, 3] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        extract_features(imagenet_3d, da.from_array(volume, chunks=8), device="cpu").compute()


def test_2d_model_is_refused(brain):
    with pytest.raises(ValueError, match="The model is 2D: inflate it first"):
        extract_features(build_model("resnet18"), brain[0], device="cpu")


# --- tiling, hypercolumns, dask ------------------------------------------------------------


def test_hypercolumns_equal_trilinear_upsampling():
    generator = torch.Generator().manual_seed(0)
    level = torch.randn(5, 6, 7, 8, generator=generator)
    pyramid = Pyramid([level], [4], torch.zeros(24, 28, 32), (24, 28, 32), (1.0, 1.0, 1.0))
    axes = [torch.arange(n) for n in (24, 28, 32)]
    expected = F.interpolate(level[None], scale_factor=4, mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(pyramid.sample_grid(axes), expected, atol=1e-5, rtol=1e-5)
    points = torch.tensor([[0, 0, 0], [23, 27, 31], [5, 9, 17]])
    torch.testing.assert_close(pyramid.sample(points), expected[:, points[:, 0], points[:, 1], points[:, 2]].T)


def test_tiled_run_equals_whole_volume(imagenet_3d, brain):
    image, _ = brain  # 48 x 96 x 96: one 96-tile covers it whole
    whole = extract_features(imagenet_3d, image, tile=96, device="cpu")
    reports = []
    tiled = extract_features(imagenet_3d, image, tile=64, overlap=0.25, device="cpu", progress=reports.append)
    assert whole.shape == tiled.shape == (16 + 24 + 32, *image.shape)
    encoding = [r for r in reports if r.message.startswith("encoding")]
    assert [r.step for r in encoding] == list(range(1, 5)) and encoding[-1].total == 4  # 1 x 2 x 2 tiles
    # Measured: 0.03 % (stride 2), 0.05 % (stride 4) and 1.4 % (stride 8) relative L2 error.
    for lo, hi, bound in ((0, 16, 0.002), (16, 40, 0.005), (40, 72, 0.03)):
        error = np.linalg.norm(tiled[lo:hi] - whole[lo:hi]) / np.linalg.norm(whole[lo:hi])
        assert error < bound, (lo, error)


def test_dask_input_is_lazy_and_matches(imagenet_3d, brain):
    image, _ = brain
    image = image[:32, :64, :64]
    eager = extract_features(imagenet_3d, image, device="cpu")
    lazy = extract_features(imagenet_3d, da.from_array(image, chunks=(16, 32, 32)), device="cpu")
    assert isinstance(lazy, da.Array)
    assert lazy.shape == eager.shape and lazy.chunks[1:] == ((16, 16), (32, 32), (32, 32))
    computed = lazy.compute(scheduler="threads")
    # Blocks see a 16-voxel halo instead of the whole volume: measured 2.2 % relative error.
    assert np.linalg.norm(computed - eager) / np.linalg.norm(eager) < 0.05


def test_anisotropic_spacing_resamples_and_returns_source_grid(imagenet_3d, brain):
    image = brain[0][::3]  # 16 slices of 3 mm
    assert spacing_scale((3.0, 1.0, 1.0)) == (3.0, 1.0, 1.0)
    assert spacing_scale((1.5, 1.0, 1.0)) == (1.0, 1.0, 1.0)  # mild anisotropy: left alone
    job = encode_job(
        imagenet_3d, image, intensity_stats(image), levels=[0], scale=(3.0, 1.0, 1.0), device=resolve_device("cpu")
    )
    pyramid = run_job(job)
    assert pyramid.intensity.shape == (48, 96, 96)  # 16 slices resampled to 48 on the encoded grid
    features = extract_features(imagenet_3d, image, spacing=(3.0, 1.0, 1.0), levels=[0], device="cpu")
    assert features.shape == (16, *image.shape)


def test_feature_stride_and_pca(imagenet_3d, brain):
    image = brain[0][:24, :40, :40]
    features = extract_features(imagenet_3d, image, stride=4, device="cpu")
    assert features.shape == (72, 6, 10, 10)
    rgb = pca_rgb(features)
    assert rgb.shape == (6, 10, 10, 3) and rgb.dtype == np.float32
    assert rgb.min() == 0.0 and rgb.max() == 1.0
    np.testing.assert_array_equal(rgb, pca_rgb(features))  # deterministic colours


def test_out_of_memory_shrinks_the_tile(imagenet_3d, brain, monkeypatch):
    image = brain[0][:32, :64, :64]
    model = copy.deepcopy(imagenet_3d)
    forward = model.forward_features

    def small_tiles_only(x):
        if x.shape[-1] > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(x)

    monkeypatch.setattr(model, "forward_features", small_tiles_only)
    reports = []
    result = extract_features(model, image, tile=64, overlap=0.5, device="cpu", progress=reports.append)
    retries = [r.message for r in reports if "out of memory" in r.message]
    assert retries == [
        "out of memory with tile 64, batch 1 on cpu: retrying with tile 48, batch 1 on cpu",
        "out of memory with tile 48, batch 1 on cpu: retrying with tile 32, batch 1 on cpu",
    ]
    np.testing.assert_allclose(result, extract_features(imagenet_3d, image, tile=32, overlap=0.5, device="cpu"))


def test_out_of_memory_at_the_smallest_tile_raises(imagenet_3d, brain, monkeypatch):
    model = copy.deepcopy(imagenet_3d)

    def always(x):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model, "forward_features", always)
    with pytest.raises(torch.OutOfMemoryError):
        extract_features(model, brain[0][:16, :16, :16], tile=16, device="cpu")


def test_cancel_features_between_tiles(imagenet_3d, brain):
    job = features_job(imagenet_3d, brain[0], tile=32, device="cpu")
    first = next(job)
    assert isinstance(first, Progress) and first.step == 1 and first.total > 1
    job.close()  # cancel: the generator stops between tiles and returns nothing
    with pytest.raises(StopIteration):
        next(job)


# --- fine-tuning ---------------------------------------------------------------------------


def test_dice_scores(brain):
    scores = dice_scores(np.array([1, 1, 2, 2]), np.array([1, 2, 2, 2]), [1, 2, 3])
    assert scores[1] == pytest.approx(2 / 3) and scores[2] == pytest.approx(0.8) and np.isnan(scores[3])
    truth = brain[1]
    assert dice_scores(truth, truth, [1, 2, 3, 4]) == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    shifted = dice_scores(np.roll(truth, 1, axis=2), truth, [3])[3]
    assert 0 < shifted < 1


@pytest.fixture(scope="module")
def strokes(brain):
    return paint_strokes(brain[1], slices=5, strokes_per_class=3, seed=0)


def test_finetune_on_strokes_segments_unpainted_slices(imagenet_3d, brain, strokes, tmp_path):
    image, truth = brain
    segmenter = Segmenter(imagenet_3d, ["background", "other", "grey matter", "white matter"])
    reports = []
    summary = finetune(segmenter, image, strokes, steps=150, device="cpu", progress=reports.append)
    losses = [r.loss for r in reports if r.loss is not None]
    assert len(losses) == summary["steps"] and all(np.isfinite(losses))
    assert summary["validation"] > 0 and summary["depth"] in range(4)
    # Every hypercolumn candidate trained, simplest first: grey value, + smoothed, + 1..3 levels.
    candidates = list(dict.fromkeys(r.message.split(", step")[0] for r in reports if r.loss is not None))
    assert candidates == ["depth 0", "depth 0 + smoothed", *(f"depth {d} + smoothed" for d in (1, 2, 3))]
    labels, probabilities = segment(segmenter, image, device="cpu")
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert probabilities.shape == (4, *image.shape) and probabilities.dtype == np.float16
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1, atol=5e-3)
    unpainted = np.ones(image.shape[0], dtype=bool)
    unpainted[np.unique(np.nonzero(strokes)[0])] = False
    for cls in (3, 4):  # grey and white matter; measured 0.93-0.96
        assert dice_scores(labels[unpainted], truth[unpainted], [cls])[cls] > 0.85

    # Save and reload: the same predictions.
    written = save_segmenter(segmenter, tmp_path / "model")
    names = ["encoder.json", "encoder.safetensors", "head.safetensors", "segmenter.json"]
    assert sorted(p.name for p in written) == names
    reloaded = load_segmenter(tmp_path / "model")
    assert reloaded.class_names == segmenter.class_names and reloaded.depth == segmenter.depth
    assert reloaded.smooth == segmenter.smooth and reloaded.smoothing == (1.0, 2.0, 4.0)
    again, _ = segment(reloaded, image, device="cpu")
    np.testing.assert_array_equal(again, labels)

    # Warm start: more strokes, training continues from the model and reuses the features.
    more = paint_strokes(truth, slices=7, strokes_per_class=3, seed=1)
    more[strokes > 0] = strokes[strokes > 0]
    steps_before, depth = segmenter.trained_steps, segmenter.depth
    reports = []
    finetune(segmenter, image, more, steps=20, device="cpu", progress=reports.append)
    assert reports[0].message == "encoder features reused from the cache"
    assert segmenter.trained_steps == steps_before + 20 and segmenter.depth == depth


def test_cancel_keeps_best_model(imagenet_3d, brain, strokes):
    image, _ = brain
    segmenter = Segmenter(imagenet_3d, 4)
    job = finetune_job(segmenter, image, strokes, steps=100, select_depth=False, device="cpu")
    for report in job:
        if report.loss is not None and report.step == 25:
            break
    job.close()
    assert segmenter.trained_steps == 25
    # The held-out loss was evaluated at steps 1, 10 and 20; the segmenter holds the best of those.
    assert segmenter.depth == 3
    labels, _ = segment(segmenter, image[:8], device="cpu")
    assert labels.shape == (8, *image.shape[1:])


@pytest.mark.parametrize(
    ("paint", "message"),
    [
        (lambda s: np.zeros_like(s), "no annotated voxels"),
        (lambda s: (s == 3).astype(np.uint8) * 3, "Only class 3 is annotated"),
        (lambda s: np.where(s > 0, 7, 0).astype(np.uint8), r"0 \(not annotated\) or 1..4"),
        (lambda s: s.astype(np.float32), "Expected integer labels"),
        (lambda s: s[:-1], "expected the image's shape"),
    ],
)
def test_bad_annotations_are_refused(imagenet_3d, brain, strokes, paint, message):
    segmenter = Segmenter(imagenet_3d, 4)
    with pytest.raises(ValueError, match=message):
        finetune(segmenter, brain[0], paint(strokes), steps=1, device="cpu")


def test_untrained_segmenter_refuses_to_segment(imagenet_3d, brain):
    with pytest.raises(ValueError, match="untrained"):
        segment(Segmenter(imagenet_3d, 2), brain[0], device="cpu")


def test_full_finetuning_trains_the_encoder(imagenet_3d, brain, strokes):
    image, _ = brain
    segmenter = Segmenter(imagenet_3d, 4)
    before = segmenter.encoder.features[0][0].weight.detach().clone()
    summary = finetune(segmenter, image, strokes, steps=12, full=True, crop=32, device="cpu")
    assert summary["depth"] == 3 and summary["smooth"] and np.isfinite(summary["best_loss"])
    after = segmenter.encoder.features[0][0].weight.detach()
    assert not torch.equal(before, after)  # the best model kept is one with a trained encoder
    assert torch.equal(imagenet_3d.features[0][0].weight, before)  # the caller's network untouched
    labels, _ = segment(segmenter, image[:8], device="cpu")
    assert set(np.unique(labels)) <= {1, 2, 3, 4}


def test_smoothed_grey_values_match_scikit_image_and_stay_in_tiles(imagenet_3d, brain):
    from skimage.filters import gaussian

    image = brain[0][:30, :45, :37]
    stats = intensity_stats(image, "auto")
    unit = unit_intensity(image, stats)
    copies = smoothed_copies(unit, (1.0, 2.5))
    assert copies.shape == (2, 30, 45, 37) and copies.dtype == torch.float32
    np.testing.assert_allclose(copies[1].numpy(), gaussian(unit.numpy(), sigma=2.5, mode="nearest"), atol=1e-6)
    # On the pyramid: the same values on the encoded grid, zero padding to the stride-8 grid.
    cpu = torch.device("cpu")
    plain = run_job(encode_job(imagenet_3d, image, stats, levels=[0, 1, 2], device=cpu))
    pyramid = plain.with_smoothing((1.0, 2.5))
    assert pyramid.smoothed.shape == (2, 32, 48, 40) and pyramid.padded_shape == (32, 48, 40)
    torch.testing.assert_close(pyramid.smoothed[:, :30, :45, :37], copies)
    assert pyramid.smoothed[:, 30:].abs().max() == 0 and pyramid.smoothed[:, :, :, 37:].abs().max() == 0
    assert pyramid.channels(intensity=True, smoothed=True, depth=0) == 3
    with pytest.raises(ValueError, match="no smoothed grey values"):
        plain.sample(torch.zeros(1, 3), intensity=True, smoothed=True)


def test_smoothed_grey_values_help_on_noisy_nuclei(nuclei_block):
    """Confocal nuclei from scribbles: smoothed grey values beat the raw grey value alone (our
    default model's first level; measured Dice 0.959 vs 0.924)."""
    from napari_crossd.engine import prepare_model

    image, truth, spacing = nuclei_block
    strokes = paint_strokes(truth, slices=5, strokes_per_class=3, seed=1)
    unpainted = np.ones(image.shape[0], dtype=bool)
    unpainted[np.unique(np.nonzero(strokes)[0])] = False
    model = prepare_model("default")
    scores = {}
    for smoothing in ((), (1.0, 2.0, 4.0)):
        segmenter = Segmenter(model, ["background", "nucleus"], levels=[0], smoothing=smoothing)
        summary = finetune(segmenter, image, strokes, spacing=spacing, steps=100, device="cpu")
        labels, _ = segment(segmenter, image, spacing=spacing, device="cpu")
        scores[smoothing] = (summary["smooth"], dice_scores(labels[unpainted], truth[unpainted], [2])[2])
    assert scores[()][0] is False and scores[(1.0, 2.0, 4.0)][0] is True, scores
    assert scores[(1.0, 2.0, 4.0)][1] > 0.93 and scores[(1.0, 2.0, 4.0)][1] > scores[()][1] + 0.015, scores


def test_segmenter_saved_before_smoothing_loads_without_it(imagenet_3d, brain, strokes, tmp_path):
    import json

    segmenter = Segmenter(imagenet_3d, 4, smoothing=())
    finetune(segmenter, brain[0], strokes, steps=10, select_depth=False, device="cpu")
    labels, _ = segment(segmenter, brain[0], device="cpu")
    save_segmenter(segmenter, tmp_path / "old")
    config_path = tmp_path / "old" / "segmenter.json"
    config = json.loads(config_path.read_text())
    del config["smoothing"], config["smooth"]  # what version 1 wrote
    config_path.write_text(json.dumps(config))
    reloaded = load_segmenter(tmp_path / "old")
    assert reloaded.smoothing == () and reloaded.smooth is False
    np.testing.assert_array_equal(segment(reloaded, brain[0], device="cpu")[0], labels)


def test_dask_segmentation(imagenet_3d, brain, strokes):
    image, _ = brain
    segmenter = Segmenter(imagenet_3d, 4)
    finetune(segmenter, image, strokes, steps=30, select_depth=False, device="cpu")  # all levels, smoothed
    assert segmenter.smooth
    eager, _ = segment(segmenter, image, device="cpu")
    labels, probabilities = segment(segmenter, da.from_array(image, chunks=(24, 48, 48)), device="cpu")
    assert isinstance(labels, da.Array) and labels.shape == image.shape
    assert isinstance(probabilities, da.Array) and probabilities.shape == (4, *image.shape)
    agree = (labels.compute() == eager).mean()
    assert agree > 0.98


def test_dask_graph_runs_in_worker_processes(imagenet_3d, brain):
    # What a dask.distributed cluster needs: every task pickles (model included) and runs elsewhere.
    image = brain[0][:16, :32, :32]
    lazy = extract_features(imagenet_3d, da.from_array(image, chunks=(16, 16, 16)), device="cpu")
    in_processes = lazy.compute(scheduler="processes", num_workers=2)
    np.testing.assert_allclose(in_processes, lazy.compute(scheduler="threads"), atol=1e-6)
