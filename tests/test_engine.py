"""The volume engine on real data: tiling, dask, normalisation, fine-tuning, cancellation, saving."""

from __future__ import annotations

import copy
import dataclasses

import dask.array as da
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_crossd import build_model
from napari_crossd.engine import (
    Annotations,
    FeatureSpec,
    Progress,
    Segmenter,
    VolumeFeatures,
    default_spec,
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
from napari_crossd.engine.classifier import ForestClassifier
from napari_crossd.engine.normalize import network_input, unit_intensity
from napari_crossd.engine.pyramid import Pyramid, encode_job, spacing_scale
from napari_crossd.evaluation import dice_scores, paint_strokes
from napari_crossd.models import Normalization


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
    imagenet = Normalization("imagenet", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
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
    model = copy.deepcopy(imagenet_3d)
    forwards = []
    model.features[0].register_forward_hook(lambda *_: forwards.append(1))
    job = features_job(model, brain[0], tile=32, device="cpu")
    first = next(job)
    assert isinstance(first, Progress) and first.step == 1 and first.total == 2 * 4 * 4
    job.close()  # cancel: the generator stops between tiles
    assert len(forwards) == 1  # one tile of 32 was encoded, no more


# --- segmentation from strokes ------------------------------------------------------------


def test_dice_scores(brain):
    scores = dice_scores(np.array([1, 1, 2, 2]), np.array([1, 2, 2, 2]), [1, 2, 3])
    assert scores[1] == pytest.approx(2 / 3) and scores[2] == pytest.approx(0.8) and np.isnan(scores[3])
    truth = brain[1]
    assert dice_scores(truth, truth, [1, 2, 3, 4]) == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    shifted = dice_scores(np.roll(truth, 1, axis=2), truth, [3])[3]
    assert 0 < shifted < 1


TISSUES = ["background", "other", "grey matter", "white matter"]


@pytest.fixture(scope="module")
def strokes(brain):
    return paint_strokes(brain[1], slices=5, strokes_per_class=3, seed=0)


def _unpainted(strokes: np.ndarray) -> np.ndarray:
    unpainted = np.ones(strokes.shape[0], dtype=bool)
    unpainted[np.unique(np.nonzero(strokes)[0])] = False
    return unpainted


@pytest.fixture(scope="module")
def trained(imagenet_3d, brain, strokes):
    """A default segmenter trained on the strokes, its feature cache and what training reported."""
    segmenter = Segmenter(imagenet_3d, TISSUES)
    features = segmenter.features(brain[0])
    reports = []
    summary = finetune(segmenter, brain[0], strokes, features=features, device="cpu", progress=reports.append)
    return segmenter, features, summary, reports


def test_forest_on_filters_and_levels_segments_unpainted_slices(trained, brain, strokes):
    image, truth = brain
    segmenter, features, summary, reports = trained
    # Searched: grey value + 5 sigmas x (gaussian, gradient, log, 3 Hessian eigenvalues) + 0..4 levels
    # (strides 2, 4, 8, 16), one cross-validated F1 each; kept: the chosen prefix.
    widths = [1 + 5 * 6 + sum((16, 24, 32, 96)[:depth]) for depth in range(5)]
    assert len(default_spec(segmenter.encoder).names(segmenter.encoder)) == widths[-1] == features.channels
    choice = summary["levels"]
    assert len(choice["scores"]) == 5 and all(0 < score <= 1 for score in choice["scores"])
    assert summary["channels"] == widths[choice["levels"]] == segmenter.spec.channels(segmenter.encoder)
    assert segmenter.spec.levels == default_spec(segmenter.encoder).levels[: choice["levels"]]
    assert summary["voxels"] == int((strokes > 0).sum())
    assert summary["classes"] == [2, 3, 4] == np.unique(strokes[strokes > 0]).tolist()  # no background here
    assert list(dict.fromkeys(r.phase for r in reports)) == ["features", "encode", "fit"]
    assert "choosing the encoder levels by cross-validation over painted planes" in [r.message for r in reports]
    labels, probabilities = segment(segmenter, image, features=features, device="cpu")
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert probabilities.shape == (4, *image.shape) and probabilities.dtype == np.float16
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1, atol=5e-3)
    np.testing.assert_array_equal(labels, probabilities.argmax(0) + 1)
    unpainted = _unpainted(strokes)
    scores = dice_scores(labels[unpainted], truth[unpainted], [3, 4])
    assert scores[3] > 0.85 and scores[4] > 0.85, scores  # grey and white matter


def test_retraining_computes_only_new_voxels(imagenet_3d, brain, strokes):
    image, truth = brain
    segmenter = Segmenter(imagenet_3d, TISSUES)
    features = segmenter.features(image)
    finetune(segmenter, image, strokes, features=features, device="cpu")
    first = dict(features.columns)
    more = paint_strokes(truth, slices=7, strokes_per_class=3, seed=1)
    more[strokes > 0] = strokes[strokes > 0]
    reports = []
    summary = finetune(segmenter, image, more, features=features, device="cpu", progress=reports.append)
    assert not any(r.phase == "encode" for r in reports)  # the block was kept: no encoder pass
    assert summary["voxels"] == segmenter.trained_voxels == int((more > 0).sum())
    assert len(features.columns) == int((more > 0).sum())
    for key, column in first.items():  # voxels computed the first time are read back, not recomputed
        assert features.columns[key] is column


def test_forest_class_weight_is_an_option(trained, strokes):
    """``class_weight`` reaches scikit-learn's forest and changes its votes when one class is
    painted 10x less often than the others (the strokes suite measures both settings)."""
    segmenter, features, _, _ = trained
    painted = Annotations.from_labels(strokes, num_classes=len(TISSUES))
    width = segmenter.spec.channels(segmenter.encoder)
    columns = run_job(features.columns_job(painted.coords, torch.device("cpu")))[:, :width]
    rare = np.flatnonzero(painted.classes == 2)
    keep = np.concatenate([rare[::10], np.flatnonzero(painted.classes != 2)])
    votes = {}
    for weight in (None, "balanced_subsample"):
        forest = ForestClassifier(len(TISSUES), class_weight=weight).fit(columns[keep], painted.classes[keep])
        assert forest.forest.class_weight == weight
        votes[weight] = forest.predict_proba(columns[rare])[:, 1].mean()  # class 2's column
    assert abs(votes["balanced_subsample"] - votes[None]) > 0.01
    assert ForestClassifier(4).config()["class_weight"] is None  # every painted voxel counts once, as in ilastik


def test_segmenter_round_trip_and_old_format(trained, brain, tmp_path):
    import json

    import safetensors.numpy

    image, _ = brain
    segmenter, features, _, _ = trained
    labels, probabilities = segment(segmenter, image, features=features, device="cpu")
    written = save_segmenter(segmenter, tmp_path / "model")
    names = ["encoder.json", "encoder.safetensors", "forest.safetensors", "segmenter.json"]
    assert sorted(p.name for p in written) == names
    assert "values" in safetensors.numpy.load_file(tmp_path / "model" / "forest.safetensors")  # arrays, no pickle
    reloaded = load_segmenter(tmp_path / "model")
    assert reloaded.class_names == TISSUES and reloaded.spec == segmenter.spec
    again, again_probabilities = segment(reloaded, image, device="cpu")
    np.testing.assert_array_equal(again, labels)
    np.testing.assert_array_equal(again_probabilities, probabilities)
    assert reloaded.classifier.config() == segmenter.classifier.config()
    config_path = tmp_path / "model" / "segmenter.json"
    config = json.loads(config_path.read_text())
    # Saved before class weights were an option: loaded with the weighting it was trained with.
    config_path.write_text(json.dumps({**config, "classifier": {k: v for k, v in config["classifier"].items()
                                                                if k != "class_weight"}}))
    assert load_segmenter(tmp_path / "model").classifier.class_weight == "balanced_subsample"
    # Saved before max_features was: trained with sqrt(channels) per split, and retrained so.
    config_path.write_text(json.dumps({**config, "classifier": {k: v for k, v in config["classifier"].items()
                                                                if k != "max_features"}}))
    assert load_segmenter(tmp_path / "model").classifier.max_features == "sqrt"
    assert segmenter.classifier.max_features == 0.3  # today's default
    # Saved with class weights (the default until 2026-12-02): retrained with them.
    weighted = {**config["classifier"], "class_weight": "balanced_subsample"}
    config_path.write_text(json.dumps({**config, "classifier": weighted}))
    assert load_segmenter(tmp_path / "model").classifier.class_weight == "balanced_subsample"
    assert segmenter.classifier.class_weight is None  # today's default
    # What version 1 (an MLP head on hypercolumns) wrote is refused with how to retrain.
    config_path.write_text(json.dumps({**config, "version": 1}))
    with pytest.raises(ValueError, match=r"format version 1.*retrain with `crossd finetune IMAGE STROKES --model"):
        load_segmenter(tmp_path / "model")


def test_segment_writes_labels_into_a_memmap(trained, brain, tmp_path):
    image, _ = brain
    segmenter, features, _, _ = trained
    expected, _ = segment(segmenter, image, features=features, device="cpu", probabilities=False)
    out = np.lib.format.open_memmap(tmp_path / "labels.npy", mode="w+", dtype=np.uint8, shape=image.shape)
    labels, probabilities = segment(segmenter, image, features=features, device="cpu", probabilities=False, out=out)
    assert labels is out and probabilities is None
    out.flush()
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), expected)
    with pytest.raises(ValueError, match=r"out has shape \(2, 2, 2\); expected the volume's"):
        segment(segmenter, image, device="cpu", out=np.zeros((2, 2, 2), np.uint8))


class _ReadLog:
    """A (Z, Y, X) array that records each read and refuses to be read whole (what a
    memory-mapped volume bigger than memory needs)."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        part = self.array[key]
        self.reads.append(part.size)
        return part

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole volume was read at once")


def test_segmentation_reads_the_volume_block_by_block(imagenet_3d, brain, strokes):
    image, _ = brain
    spec = FeatureSpec((0, 1), sigmas=(1.0, 2.0))  # a halo of 8 voxels: blocks of this small crop
    segmenter = Segmenter(imagenet_3d, TISSUES, spec=spec)
    finetune(segmenter, image, strokes, select=False, device="cpu")
    expected, _ = segment(segmenter, image, device="cpu", probabilities=False)
    volume = _ReadLog(image)
    budget = int(image.size / 3 * spec.bytes_per_voxel(imagenet_3d))
    blocks = VolumeFeatures(volume, imagenet_3d, spec, block_bytes=budget)
    assert len(blocks.boxes) >= 4
    labels, _ = segment(segmenter, volume, features=blocks, device="cpu", probabilities=False)
    # The first read is the normalisation's regular subsample (at most 2^24 voxels: all of this
    # small crop); every other read is one block with its halo, once, also with auto-context
    # (always on without select): a block's stage-1 maps come from its own features.
    statistics, *block_reads = volume.reads
    assert segmenter.two_stage
    assert statistics == image.size and len(block_reads) == len(blocks.boxes)
    assert max(block_reads) <= budget / spec.bytes_per_voxel(imagenet_3d) < image.size
    # Blocks instead of one: the same filters; the encoder levels differ near block edges.
    assert (labels == expected).mean() > 0.97


def test_blocks_tile_the_volume_and_match_the_whole(imagenet_3d, mni_sample):
    image = mni_sample.image[60:108, 40:200, 40:136]  # 48 x 160 x 96 of real T1
    spec = dataclasses.replace(default_spec(imagenet_3d), sigmas=(1.0, 2.0, 4.0, 8.0))  # halo 32
    whole = VolumeFeatures(image, imagenet_3d, spec)
    budget = int(48 * 144 * 96 * spec.bytes_per_voxel(imagenet_3d))  # one cut along Y fits (halo 32 each side)
    small = VolumeFeatures(image, imagenet_3d, spec, block_bytes=budget)
    assert len(whole.boxes) == 1 and [b[1] for b in small.boxes] == [slice(0, 80), slice(80, 160)]
    covered = np.zeros(image.shape, dtype=int)
    for box in small.boxes:
        covered[box] += 1
    assert (covered == 1).all()  # every voxel in exactly one block
    cpu = torch.device("cpu")
    dense = {}
    for source in (whole, small):
        out = np.zeros((source.channels, *image.shape), np.float32)
        for _, payload in source.chunks_job(cpu):
            if payload is not None:
                out[(slice(None), *payload[0])] = payload[1].numpy()
        dense[len(source.boxes)] = out
    one, many = dense[1], dense[len(small.boxes)]
    # The grey value and the filters are exact in blocks: the halo covers their reach (the
    # coarse sigma-8 maps average 2-cubes from a block corner at an even voxel here). The
    # encoder levels see two deepest strides of tissue, not their whole receptive field:
    # measured relative L2 error at strides 2, 4, 8, 16 (MobileNetV2) 0.27 %, 0.31 %, 1.1 %, 10 %.
    np.testing.assert_allclose(many[:25], one[:25], atol=2e-5)
    spans = ((25, 41), (41, 65), (65, 97), (97, 193))
    for (lo, hi), bound in zip(spans, (0.01, 0.01, 0.03, 0.15), strict=True):
        error = np.linalg.norm(many[lo:hi] - one[lo:hi]) / np.linalg.norm(one[lo:hi])
        assert error < bound, (lo, error)
    # Training reads the vectors prediction does (to float rounding: points vs a dense box).
    coords = np.array([[3, 5, 7], [40, 60, 2], [20, 79, 63], [20, 80, 95]])
    np.testing.assert_allclose(run_job(small.columns_job(coords, cpu)), many[:, coords[:, 0], coords[:, 1],
                                                                            coords[:, 2]].T, rtol=1e-5, atol=1e-6)


def test_prediction_assembles_only_the_encoder_levels_the_segmenter_kept(imagenet_3d, mni_sample, monkeypatch):
    import napari_crossd.engine.pyramid as pyramid

    image = mni_sample.image[60:92, 40:104, 40:104]  # 32 x 64 x 64 of real T1
    spec = default_spec(imagenet_3d)  # 4 levels: what the cache holds before the levels are chosen
    source = VolumeFeatures(image, imagenet_3d, spec)
    kept = dataclasses.replace(spec, levels=spec.levels[:1])  # what choose_levels may keep
    upsampled = []
    original = pyramid._upsampled_box
    monkeypatch.setattr(pyramid, "_upsampled_box", lambda m, *a: upsampled.append(m.shape[0]) or original(m, *a))
    cpu = torch.device("cpu")

    def dense(chosen):
        upsampled.clear()
        chunks = [payload for _, payload in source.chunks_job(cpu, chosen) if payload is not None]
        return torch.cat([features for _, features in chunks], dim=1), list(upsampled)

    everything, all_maps = dense(None)
    only_kept, kept_maps = dense(kept)
    assert only_kept.shape[0] == kept.channels(imagenet_3d) < everything.shape[0] == spec.channels(imagenet_3d)
    torch.testing.assert_close(only_kept, everything[: only_kept.shape[0]], rtol=0, atol=0)
    # the coarse filter maps and the first level are upsampled; the three deeper levels (24 + 32 + 96 channels) not
    levels = [imagenet_3d.feature_info[level]["num_chs"] for level in spec.levels]
    assert set(kept_maps) == {6, levels[0]} and set(all_maps) == {6, *levels}  # 6: a coarse sigma's filters
    with pytest.raises(ValueError, match="is not a part of them"):
        next(source.chunks_job(cpu, dataclasses.replace(spec, sigmas=(1.0,))))


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
        finetune(segmenter, brain[0], paint(strokes), device="cpu")
    assert not segmenter.trained


def test_annotations_are_one_rule():
    labels = np.zeros((4, 6, 6), dtype=np.uint16)
    labels[1, 1:3, 1] = 1
    labels[2, 4, 2:5] = 3  # classes 1 and 3: class 2 unpainted is allowed
    annotations = Annotations.from_labels(labels)
    assert annotations.num_classes == 3 and annotations.painted_classes == [1, 3] and len(annotations) == 5
    assert annotations.groups().tolist() == [1, 1, 2, 2, 2]  # painted planes along the axis with fewest
    with pytest.raises(ValueError, match="for this model's 2 classes; found 3"):
        Annotations.from_labels(labels, num_classes=2)
    with pytest.raises(ValueError, match=r"Expected a 3D label volume \(Z, Y, X\), got shape \(6, 6\)"):
        Annotations.from_labels(labels[0])


def test_untrained_segmenter_refuses_to_segment(imagenet_3d, brain):
    with pytest.raises(ValueError, match="untrained"):
        segment(Segmenter(imagenet_3d, 2), brain[0], device="cpu")


def test_cancel_leaves_the_segmenter_as_it_was(trained, brain, strokes):
    image, _ = brain
    segmenter = trained[0]
    forest = segmenter.classifier.forest
    before, _ = segment(segmenter, image[:8], device="cpu", probabilities=False)
    fresh = Segmenter(segmenter.encoder, TISSUES)
    for source in (segmenter, fresh):
        job = finetune_job(source, image, strokes, device="cpu")  # no cache: features have to be computed
        assert next(job).phase == "features"
        job.close()
    assert segmenter.classifier.forest is forest and not fresh.trained
    np.testing.assert_array_equal(segment(segmenter, image[:8], device="cpu", probabilities=False)[0], before)


def test_full_finetuning_trains_a_copy_of_the_encoder(imagenet_3d, brain, strokes):
    image, _ = brain
    segmenter = Segmenter(imagenet_3d, 4)
    before = imagenet_3d.features[0][0].weight.detach().clone()
    reports = []
    summary = finetune(segmenter, image, strokes, full=True, steps=12, crop=32, device="cpu", progress=reports.append)
    losses = [r.loss for r in reports if r.phase == "encoder"]
    assert len(losses) == summary["encoder"]["steps"] == 12 and all(np.isfinite(losses))
    assert segmenter.encoder is not imagenet_3d
    assert not torch.equal(segmenter.encoder.features[0][0].weight, before)  # the best encoder is a trained one
    assert torch.equal(imagenet_3d.features[0][0].weight, before)  # the caller's network untouched
    labels, _ = segment(segmenter, image[:8], device="cpu")
    assert set(np.unique(labels)) <= {1, 2, 3, 4}


def test_concurrent_jobs_share_a_model_without_changing_it(imagenet_3d, brain):
    """Two jobs in two threads on one network (the Run and Fine-tune widgets, dask threads):
    neither moves it, switches its mode or changes a parameter, and each gets what it would alone."""
    import threading

    from napari_crossd.engine.pyramid import network_on

    model = copy.deepcopy(imagenet_3d)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    crops = [brain[0][:24, :48, :48], brain[0][24:, 48:, 48:]]
    alone = [extract_features(model, crop, device="cpu") for crop in crops]
    results, errors = [None, None], []

    def work(i):
        try:
            results[i] = extract_features(model, crops[i], tile=32, overlap=0.5, device="cpu")
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not model.training
    assert all(torch.equal(v, state[k]) and v.device.type == "cpu" for k, v in model.state_dict().items())
    for got, tiled in zip(results, [extract_features(model, c, tile=32, overlap=0.5, device="cpu") for c in crops],
                          strict=True):
        np.testing.assert_allclose(got, tiled, atol=1e-5)
    assert alone[0].shape == results[0].shape
    # A network in training mode (or on another device) runs as an eval-mode copy: its
    # BatchNorm statistics stay as they were (a forward in training mode would update them).
    assert network_on(model, torch.device("cpu")) is model
    model.train()
    runner = network_on(model, torch.device("cpu"))
    assert runner is not model and not runner.training and model.training
    extract_features(model, crops[0], device="cpu")
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_dask_segmentation(trained, brain):
    image, _ = brain
    segmenter, features, _, _ = trained
    eager, _ = segment(segmenter, image, features=features, device="cpu", probabilities=False)
    labels, probabilities = segment(segmenter, da.from_array(image, chunks=(24, 48, 48)), device="cpu")
    assert isinstance(labels, da.Array) and labels.shape == image.shape
    assert isinstance(probabilities, da.Array) and probabilities.shape == (4, *image.shape)
    # Dask blocks of 24 x 48 x 48 see a halo of 16 voxels instead of the whole crop: the
    # filters are exact, the stride-16 level is not (measured 96.4 % agreement).
    agree = (labels.compute() == eager).mean()
    assert agree > 0.95, agree


def test_dask_graph_runs_in_worker_processes(imagenet_3d, brain):
    # What a dask.distributed cluster needs: every task pickles (model included) and runs elsewhere.
    image = brain[0][:16, :32, :32]
    lazy = extract_features(imagenet_3d, da.from_array(image, chunks=(16, 16, 16)), device="cpu")
    in_processes = lazy.compute(scheduler="processes", num_workers=2)
    np.testing.assert_allclose(in_processes, lazy.compute(scheduler="threads"), atol=1e-6)


def test_full_resolution_filters_in_slabs_equal_the_whole_bank(brain, monkeypatch):
    from napari_crossd.engine import pyramid as pyramid_module
    from napari_crossd.engine.filters import filter_bank

    unit = unit_intensity(brain[0][:40, :50, :60], intensity_stats(brain[0]))
    monkeypatch.setattr(pyramid_module, "_FILTER_SLAB_VOXELS", 50 * 60)  # slabs of 2 x 8 planes (the halo)
    slabbed = pyramid_module._filter_bank_in_slabs(unit, (1.0, 2.0), ("gaussian", "hessian"))
    torch.testing.assert_close(slabbed, filter_bank(unit, (1.0, 2.0), ("gaussian", "hessian"))[1:], atol=2e-6,
                               rtol=1e-5)
