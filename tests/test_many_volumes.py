"""Many volumes: one segmenter from several annotated volumes, batches of files, a Dask cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_crossd.cli import main
from napari_crossd.engine import (
    Annotations,
    Segmenter,
    finetune_pairs,
    finetune_pairs_job,
    prepare_model,
    run_job,
    segment,
)
from napari_crossd.engine.batch import output_paths, read_pairs
from napari_crossd.evaluation import dice_scores, paint_strokes

# Two parts of the MNI152 template that share no voxel: the back of the brain with the air
# behind it, and the middle of the brain (ventricles, deep grey matter) 60 mm above it.
CROPS = {
    "back": (slice(60, 92), slice(20, 84), slice(66, 130)),
    "middle": (slice(120, 152), slice(100, 164), slice(66, 130)),
}


@pytest.fixture(scope="module")
def two_volumes(mni_sample):
    """Both crops: {name: (image, truth 1..4, strokes on 4 slices)}."""
    volumes = {}
    for seed, (name, zyx) in enumerate(CROPS.items()):
        truth = mni_sample.labels[zyx]
        volumes[name] = (mni_sample.image[zyx], truth, paint_strokes(truth, slices=4, strokes_per_class=3, seed=seed))
    return volumes


@pytest.fixture(scope="module")
def encoder():
    return prepare_model("default")


def _unpainted_dice(labels, truth, strokes, classes=(3, 4)) -> dict[int, float]:
    unpainted = np.ones(truth.shape[0], dtype=bool)
    unpainted[np.unique(np.nonzero(strokes)[0])] = False
    return dice_scores(labels[unpainted], truth[unpainted], classes)


@pytest.fixture(scope="module")
def trained_on_both(two_volumes, encoder):
    segmenter = Segmenter(encoder, ["background", "other", "grey", "white"])
    reports = []
    summary = finetune_pairs(
        segmenter, [(image, strokes) for image, _, strokes in two_volumes.values()], names=list(two_volumes),
        spacing=(1.0, 1.0, 1.0), device="cpu", progress=reports.append,
    )
    return segmenter, summary, reports


def test_one_segmenter_trains_on_two_real_volumes(two_volumes, trained_on_both):
    segmenter, summary, reports = trained_on_both
    painted = [int((strokes > 0).sum()) for _, _, strokes in two_volumes.values()]
    assert summary["per_volume"] == painted and summary["voxels"] == sum(painted)
    assert summary["classes"] == [1, 2, 3, 4]
    # progress names the volume being encoded
    features = [r.message for r in reports if r.phase == "features"]
    assert any(m.startswith("back: ") for m in features) and any(m.startswith("middle: ") for m in features)
    scores = {}
    for name, (image, truth, strokes) in two_volumes.items():
        labels, _ = segment(segmenter, image, device="cpu", probabilities=False)
        scores[name] = _unpainted_dice(labels, truth, strokes)
    print("Dice (grey, white) on unpainted slices:", scores)
    # measured: back 0.950 / 0.971, middle 0.945 / 0.965 (grey / white)
    for name in CROPS:
        assert scores[name][3] > 0.9 and scores[name][4] > 0.9, (name, scores[name])


def test_pairs_are_checked_before_any_feature_is_computed(two_volumes, encoder):
    (image, _, strokes), (image2, _, _) = two_volumes["back"], two_volumes["middle"]
    segmenter = Segmenter(encoder, 4)
    only_grey = np.where(strokes == 3, 3, 0).astype(np.uint8)
    job = finetune_pairs_job(segmenter, [(image, only_grey), (image2, np.zeros_like(strokes))], device="cpu")
    with pytest.raises(ValueError, match="volume 2/2: The labels have no annotated voxels"):
        next(job)
    job = finetune_pairs_job(segmenter, [(image, only_grey), (image2, only_grey)], device="cpu")
    with pytest.raises(ValueError, match="Only class 3 is annotated in all 2 volumes"):
        next(job)
    job = finetune_pairs_job(segmenter, [(image, strokes), (image2, strokes[:, :10])], names=["a", "b"])
    with pytest.raises(ValueError, match=r"b: The labels have shape \(32, 10, 64\)"):
        next(job)
    job = finetune_pairs_job(segmenter, [(image, strokes), (image2, strokes)], full=True)
    with pytest.raises(ValueError, match=r"full=True.*one volume; 2 pairs"):
        next(job)
    # one class per volume is enough when two are painted over all of them
    only_white = np.where(strokes == 4, 4, 0).astype(np.uint8)
    summary = finetune_pairs(segmenter, [(image, only_grey), (image2, only_white)], device="cpu", select=False)
    assert summary["classes"] == [3, 4] and segmenter.trained


def test_pairs_csv_reads_relative_paths_and_an_optional_header(tmp_path):
    (tmp_path / "pairs.csv").write_text("image,labels\na.nii.gz, a_strokes.nii.gz\n\nsub/b.npy,/data/b.npy\n")
    assert read_pairs(tmp_path / "pairs.csv") == [
        (tmp_path / "a.nii.gz", tmp_path / "a_strokes.nii.gz"), (tmp_path / "sub/b.npy", Path("/data/b.npy"))
    ]
    (tmp_path / "plain.csv").write_text("a.npy,a_labels.npy\n")
    assert read_pairs(tmp_path / "plain.csv") == [(tmp_path / "a.npy", tmp_path / "a_labels.npy")]
    (tmp_path / "bad.csv").write_text("image,labels\na.npy,b.npy,c.npy\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 2: expected 'image,labels', got 'a.npy,b.npy,c.npy'"):
        read_pairs(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("image,labels\n")
    with pytest.raises(ValueError, match="lists no image,labels rows"):
        read_pairs(tmp_path / "empty.csv")


def test_output_paths_never_replace_an_input(tmp_path):
    assert output_paths([tmp_path / "in" / "a.nii.gz"], tmp_path / "out") == [tmp_path / "out" / "a.nii.gz"]
    with pytest.raises(ValueError, match="would replace the input"):
        output_paths([tmp_path / "a.npy"], tmp_path)
    with pytest.raises(ValueError, match=r"Several inputs are named a\.npy"):
        output_paths([tmp_path / "x" / "a.npy", tmp_path / "y" / "a.npy"], tmp_path / "out")


def test_cli_trains_on_pairs_and_segments_a_batch_with_a_bad_file(two_volumes, tmp_path, capsys):
    for name, (image, _, strokes) in two_volumes.items():
        np.save(tmp_path / f"{name}.npy", image)
        np.save(tmp_path / f"{name}_strokes.npy", strokes)
    (tmp_path / "pairs.csv").write_text("image,labels\nback.npy,back_strokes.npy\nmiddle.npy,middle_strokes.npy\n")
    model = tmp_path / "model"
    assert main(["finetune", "--pairs", str(tmp_path / "pairs.csv"), "--device", "cpu", "--out", str(model)]) == 0
    assert "classes [1, 2, 3, 4] in 2 volumes" in capsys.readouterr().out

    np.save(tmp_path / "flat.npy", np.zeros((64, 64), np.float32))  # a 2D image among 3D ones
    (tmp_path / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    inputs = [tmp_path / n for n in ("back.npy", "flat.npy", "broken.nii.gz", "middle.npy")]
    code = main(["segment", *map(str, inputs), "--model", str(model), "--device", "cpu",
                 "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "flat.npy: failed: flat.npy: expected a 3D volume (Z, Y, X), got shape (64, 64)" in err
    assert "broken.nii.gz: failed: Cannot read broken.nii.gz" in err
    assert "2 of 4 inputs failed (flat.npy, broken.nii.gz)" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["back.npy", "middle.npy"]
    for name, (_, truth, strokes) in two_volumes.items():
        labels = np.load(tmp_path / "out" / f"{name}.npy")
        assert labels.shape == truth.shape and labels.dtype == np.uint8
        scores = _unpainted_dice(labels, truth, strokes)
        assert scores[3] > 0.75 and scores[4] > 0.8, (name, scores)

    # one input per --out; and the inputs are never overwritten
    assert main(["segment", *map(str, inputs[:2]), "--model", str(model), "--out", str(tmp_path / "s.npy")]) == 2
    assert "--out names one file for 2 inputs: use --out-dir DIR" in capsys.readouterr().err
    assert main(["segment", str(inputs[0]), "--model", str(model), "--out-dir", str(tmp_path)]) == 2
    assert "would replace the input" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(inputs[0]), two_volumes["back"][0])


def test_cli_features_of_several_files(two_volumes, tmp_path, capsys):
    for name, (image, _, _) in two_volumes.items():
        np.save(tmp_path / f"{name}.npy", image)
    assert main(["features", str(tmp_path / "back.npy"), str(tmp_path / "middle.npy"), "--device", "cpu",
                 "--out-dir", str(tmp_path / "features")]) == 0
    for name, (image, _, _) in two_volumes.items():
        assert np.load(tmp_path / "features" / f"{name}.npy", mmap_mode="r").shape == (72, *image.shape)
    assert main(["features", str(tmp_path / "back.npy"), str(tmp_path / "middle.npy"), "--pca",
                 str(tmp_path / "p.npy"), "--out-dir", str(tmp_path / "f2")]) == 2
    assert "--pca writes one file: use it with --out and a single input" in capsys.readouterr().err


def test_annotations_allow_one_class_per_volume_only_when_asked():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 2] = 2
    assert Annotations.from_labels(labels, min_classes=1).painted_classes == [2]
    with pytest.raises(ValueError, match="Only class 2 is annotated"):
        Annotations.from_labels(labels)


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes on 127.0.0.1, one thread each, no dashboard."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, timeout=120) as local:
        with distributed.Client(local, timeout=60) as client:
            yield local, client


def test_cluster_segmentation_agrees_with_the_local_run(cluster, two_volumes, trained_on_both, tmp_path):
    from distributed import get_task_stream

    from napari_crossd.engine.cluster import segment_on_cluster_job

    local_cluster, client = cluster
    segmenter = trained_on_both[0]
    image, truth, strokes = two_volumes["middle"]
    local, local_probabilities = segment(segmenter, image, device="cpu")
    reports = []
    with get_task_stream(client) as stream:
        labels, probabilities = run_job(
            segment_on_cluster_job(client, segmenter, image, device="cpu", block=32, probabilities=True),
            reports.append,
        )
    workers = set(client.scheduler_info()["workers"])
    blocks = [task for task in stream.data if task["key"].startswith("crossd-segment-")]
    assert len(blocks) == 4  # 32 x 64 x 64 in blocks of 32^3, each computed by a worker of this cluster
    assert {task["worker"] for task in blocks} <= workers
    assert [r.step for r in reports] == [0, 1, 2, 3, 4] and reports[-1].total == 4
    assert (labels == local).mean() >= 0.99
    assert np.abs(probabilities.astype(np.float32) - local_probabilities).max() < 0.25
    assert _unpainted_dice(labels, truth, strokes)[4] > 0.8

    # the command line's --scheduler: the same labels, written by the client
    model = tmp_path / "model"
    from napari_crossd.engine import save_segmenter

    save_segmenter(segmenter, model)
    np.save(tmp_path / "middle.npy", image)
    assert main(["segment", str(tmp_path / "middle.npy"), "--model", str(model), "--device", "cpu",
                 "--scheduler", local_cluster.scheduler_address, "--block", "32",
                 "--out", str(tmp_path / "seg.npy")]) == 0
    assert (np.load(tmp_path / "seg.npy") == local).mean() >= 0.99


class _RecordingClient:
    """A client that notes what is scattered and what every task is given."""

    def __init__(self, client) -> None:
        self.client, self.scattered, self.task_arguments = client, [], []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def scatter(self, data, **kwargs):
        self.scattered.append((type(data).__name__, kwargs.get("broadcast", False)))
        return self.client.scatter(data, **kwargs)

    def submit(self, function, *args, **kwargs):
        self.task_arguments.append([type(a).__name__ for a in args])
        return self.client.submit(function, *args, **kwargs)


def test_cluster_features_scatter_the_model_once_and_agree_with_the_local_run(cluster, two_volumes, encoder):
    from napari_crossd.engine import extract_features
    from napari_crossd.engine.cluster import features_on_cluster_job

    client = _RecordingClient(cluster[1])
    image = two_volumes["back"][0]
    features = run_job(features_on_cluster_job(client, encoder, image, device="cpu", block=32))
    # the model went to every worker once; each of the 4 tasks got futures: the model's and its block's
    assert client.scattered == [("_Pickled", True)] + [("ndarray", False)] * 4
    assert client.task_arguments == [["Future", "Future", "tuple"]] * 4
    local = extract_features(encoder, image, device="cpu")
    assert features.shape == local.shape == (72, *image.shape)
    # blocks see a halo of 16 voxels, not the whole volume: the deepest levels differ near block faces
    error = np.abs(features - local).mean() / local.std()
    assert error < 0.05, error


def test_cluster_address_that_does_not_answer_is_a_clear_error(two_volumes, tmp_path, capsys):
    np.save(tmp_path / "a.npy", two_volumes["back"][0])
    assert main(["features", str(tmp_path / "a.npy"), "--scheduler", "tcp://127.0.0.1:9", "--device", "cpu",
                 "--out", str(tmp_path / "f.npy")]) == 2
    assert "--scheduler tcp://127.0.0.1:9: no Dask scheduler answers there" in capsys.readouterr().err
