"""``crossd demo --headless``: the plugin's pipeline end to end without a display."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

from napari_crossd.cli import main


def test_headless_demo_writes_outputs_without_a_display(tmp_path, mni_t1, mobilenet_v2_imagenet_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    done = subprocess.run(
        [sys.executable, "-m", "napari_crossd.cli", "demo", "--headless", "--region", "small",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shape"] == [32, 64, 64] and summary["finetune"]["voxels"] == summary["painted_voxels"]
    assert summary["segmenter"].startswith(f"{summary['finetune']['channels']} features (grey value, filters")
    assert summary["screenshot"].startswith("composed with numpy (no display)")
    assert {"features.npy", "features_pca.npy", "segmentation.nii.gz", "strokes.nii.gz", "screenshot.png",
            "segmenter", "summary.json"} <= set(summary["outputs"])
    features = np.load(out / "features.npy")
    pca = np.load(out / "features_pca.npy")
    assert features.shape[1:] == (32, 64, 64) and features.shape[0] == summary["features"][0] >= 3
    assert pca.shape == (32, 64, 64, 3) and 0 <= pca.min() and pca.max() <= 1
    # The segmentation lands on the MNI152 file's grid: voxel (66, 20, 60) of the template.
    segmentation = nib.load(out / "segmentation.nii.gz")
    assert segmentation.shape == (64, 64, 32)
    np.testing.assert_allclose(segmentation.affine[:3, 3], [-98 + 66, -134 + 20, -72 + 60])
    labels = np.asarray(segmentation.dataobj)
    assert set(np.unique(labels)) <= {1, 2, 3, 4}
    # Dice against the tissue labels (measured 0.98 / 0.46 / 0.72 / 0.78 after 30 steps).
    dice = summary["dice"]
    assert dice["background"] >= 0.9 and dice["white matter"] >= 0.6 and dice["grey matter"] >= 0.55
    assert summary["mean_dice"] >= 0.6
    screenshot = iio.imread(out / "screenshot.png")
    assert screenshot.shape == (64, 3 * 64 + 2 * 4, 3)  # T1 + strokes | PCA | segmentation, one axial slice
    assert screenshot.std() > 10


def test_demo_arguments(capsys):
    assert main(["demo", "--headless"]) == 2
    assert "--headless needs --out DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--region", "everything"])


def test_demo_without_the_sample_names_the_command_that_installs_it(tmp_path, monkeypatch, capsys):
    """A plain ``pip install napari-crossd`` has no MNI152 sample: the demo says how to get it, at once."""
    from napari_crossd.io import samples

    find_spec = samples.importlib.util.find_spec
    monkeypatch.setattr(samples.importlib.util, "find_spec",
                        lambda name, *args: None if name == "nilearn" else find_spec(name, *args))
    out = tmp_path / "demo"
    for headless in (["--headless", "--out", str(out)], []):
        assert main(["demo", *headless]) == 2
        err = capsys.readouterr().err
        assert err.startswith("crossd demo: error: the demo needs the MNI152 sample.")
        assert 'pip install "napari-crossd[samples]"' in err
    assert not out.exists()  # nothing ran
    # nilearn present but without the template (older than the extra asks for): the same command.
    monkeypatch.setattr(samples, "package_dir", lambda package, install: tmp_path)
    with pytest.raises(ModuleNotFoundError, match=r'missing .*pip install "napari-crossd\[samples\]"'):
        samples.mni152_path("gm")


def test_samples_extra_carries_the_template_and_all_includes_it():
    """The command in the message installs what the demo needs: setup.cfg's samples extra, also in [all]."""
    import configparser
    from pathlib import Path

    from packaging.requirements import Requirement

    from napari_crossd.io.samples import MNI152_INSTALL

    config = configparser.ConfigParser()
    config.read(Path(__file__).parents[1] / "setup.cfg")
    extras = {name: [Requirement(line) for line in value.split("\n") if line.strip()]
              for name, value in config["options.extras_require"].items()}
    [samples] = extras["samples"]
    assert samples.name == "nilearn" and str(samples) in MNI152_INSTALL
    assert str(samples) in [str(requirement) for requirement in extras["all"]]
