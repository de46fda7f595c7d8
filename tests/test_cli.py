"""The ``crossd`` command line: the same engine functions, driven from a terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from napari_crossd import inflate, load_model
from napari_crossd.cli import main


def test_inflate_command_writes_a_model_that_reloads_to_the_same_3d_network(
    mobilenet_v2_imagenet_path, mni_t1, tmp_path, capsys
):
    out = tmp_path / "mobilenet3d.safetensors"
    # "imagenet" names the same file.
    code = main(["inflate", "imagenet", "--arch", "auto", "--strategy", "i3d", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mobilenet_v2 (torchvision weights, 1000 classes)" in printed
    assert out.is_file() and out.with_suffix(".json").is_file()

    reloaded = load_model(out)
    assert reloaded.crossd_meta.strategy == "i3d" and reloaded.crossd_meta.spatial_dims == 3
    direct = inflate(load_model(mobilenet_v2_imagenet_path), strategy="i3d")
    volume = mni_t1[None, None, :, :32, :32].float().expand(-1, 3, -1, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(volume), direct(volume))


def test_inflate_command_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["inflate", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "crossd inflate: error:" in capsys.readouterr().err

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    hostile = tmp_path / "hostile.pth"
    torch.save({"model": Exploit()}, hostile)
    assert main(["inflate", str(hostile), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "refused" in capsys.readouterr().err.lower()
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "y.safetensors").exists()


def test_unknown_strategy_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inflate", "w.pth", "--strategy", "trilinear", "--out", str(tmp_path / "z.safetensors")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'trilinear'" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "napari_crossd.cli", "info"], capture_output=True, text=True,
                            check=True)
    assert "inflation strategies: centre, i3d, acs, crossd" in result.stdout
    assert "crossd_resnet18" in result.stdout


def test_features_finetune_segment_on_nifti_keep_the_grid(mni_crop_files, tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from napari_crossd.evaluation import dice_scores, paint_strokes

    t1 = nib.load(mni_crop_files["t1"])
    truth = mni_crop_files["truth"]  # (Z, Y, X) = the NIfTI's (k, j, i)

    # features: .npy channels first, and 4D NIfTI on the image's grid
    assert main(["features", str(mni_crop_files["t1"]), "--model", "default", "--device", "cpu",
                 "--out", str(tmp_path / "f.npy"), "--pca", str(tmp_path / "pca.nii.gz")]) == 0
    features = np.load(tmp_path / "f.npy")
    assert features.shape == (72, *truth.shape) and features.dtype == np.float32
    pca = nib.load(tmp_path / "pca.nii.gz")
    assert pca.shape == (*t1.shape, 3)
    np.testing.assert_array_equal(pca.affine, t1.affine)

    # finetune on strokes painted on the image's grid (0 = not annotated)
    strokes = paint_strokes(truth, slices=4, strokes_per_class=3, seed=0)
    strokes_path = tmp_path / "strokes.nii.gz"
    nib.save(nib.Nifti1Image(strokes.transpose(2, 1, 0).copy(), t1.affine), strokes_path)
    model_dir = tmp_path / "model"
    assert main(["finetune", str(mni_crop_files["t1"]), str(strokes_path), "--model", "default", "--steps", "60",
                 "--device", "cpu", "--classes", "background", "other", "grey", "white", "--out", str(model_dir)]) == 0
    assert "saved to" in capsys.readouterr().out
    assert (model_dir / "segmenter.json").is_file()

    # segment: same shape, affine and orientation as the image; labels 1..4
    seg_path = tmp_path / "seg.nii.gz"
    assert main(["segment", str(mni_crop_files["t1"]), "--model", str(model_dir), "--device", "cpu",
                 "--out", str(seg_path), "--probabilities", str(tmp_path / "p.npy")]) == 0
    seg = nib.load(seg_path)
    assert seg.shape == t1.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(seg.affine, t1.affine)
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(t1.affine)
    labels = np.asarray(seg.dataobj).transpose(2, 1, 0)
    unpainted = np.ones(truth.shape[0], dtype=bool)
    unpainted[np.unique(np.nonzero(strokes)[0])] = False
    scores = dice_scores(labels[unpainted], truth[unpainted], [1, 3])
    assert scores[1] > 0.9  # background (air)
    assert scores[3] > 0.8  # grey matter
    assert np.load(tmp_path / "p.npy").shape == (4, *truth.shape)

    # training again from the saved directory: its encoder, classes and features, refit on these strokes
    assert main(["finetune", str(mni_crop_files["t1"]), str(strokes_path), "--model", str(model_dir),
                 "--device", "cpu", "--out", str(tmp_path / "model2")]) == 0
    out = capsys.readouterr().out
    assert f"retraining {model_dir} ({int((strokes > 0).sum()):,} voxels last time)" in out
    assert f"trained on {int((strokes > 0).sum()):,} painted voxels of classes [1, 2, 3, 4]" in out

    # --no-context: one forest; the default keeps auto-context in its settings (used where it pays)
    import json

    assert main(["finetune", str(mni_crop_files["t1"]), str(strokes_path), "--model", "default", "--no-context",
                 "--device", "cpu", "--out", str(tmp_path / "model3")]) == 0
    assert json.loads((tmp_path / "model3" / "segmenter.json").read_text())["context"] is None
    assert json.loads((model_dir / "segmenter.json").read_text())["context"] == {"sigmas": [1.0, 2.0, 4.0],
                                                                                 "stride": 2}


def test_volume_commands_report_bad_input(mni_crop_files, tmp_path, capsys):
    t1 = str(mni_crop_files["t1"])
    cases = [
        (["segment", t1, "--model", "default", "--out", str(tmp_path / "s.nii.gz")],
         "segment needs a fine-tuned model directory"),
        (["segment", t1, "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "s.nii.gz")],
         "no such model directory"),
        (["finetune", t1, t1, "--out", str(tmp_path / "m")], "Is it the image instead of the labels?"),
        (["features", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "f.npy")], "No such file"),
        (["features", t1, "--out", str(tmp_path / "f.png")], "unsupported file type"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_default_weights_are_the_shipped_crossd_model(tmp_path, capsys):
    out = tmp_path / "default3d.safetensors"
    assert main(["inflate", "default", "--out", str(out)]) == 0
    assert "crossd_mobilenet_v2 (crossd weights, 10 classes)" in capsys.readouterr().out
    model = load_model(out)
    assert model.crossd_meta.spatial_dims == 3
    assert model.crossd_meta.normalization.name == "pretrain:fashion-mnist"
