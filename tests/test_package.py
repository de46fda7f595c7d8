"""Packaging: the npe2 manifest napari reads, and the console script."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from npe2 import PluginManifest

import napari_crossd


def test_napari_manifest_is_valid_and_registered():
    manifest = PluginManifest.from_file(Path(napari_crossd.__file__).parent / "napari.yaml")
    assert manifest.name == "napari-crossd"
    registered = {ep.name: ep.value for ep in entry_points(group="napari.manifest")}
    assert registered.get("napari-crossd") == "napari_crossd:napari.yaml"


def test_crossd_console_script_points_at_the_cli():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("crossd") == "napari_crossd.cli:main"
