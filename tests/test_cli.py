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
    # "default" names the same file: the README's main command.
    code = main(["inflate", "default", "--arch", "auto", "--strategy", "i3d", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mobilenet_v2 (torchvision weights, 1000 classes)" in printed
    assert out.is_file() and out.with_suffix(".json").is_file()

    reloaded = load_model(out)
    assert reloaded.crossd_meta["strategy"] == "i3d" and reloaded.crossd_meta["spatial_dims"] == 3
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
