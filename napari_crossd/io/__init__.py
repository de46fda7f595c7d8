"""Safe checkpoint reading and writing, architecture detection from state dicts, volumes on
disk and their voxel grids.

Volumes and grids import at once; the checkpoint names (torch) on first use
(:mod:`napari_crossd._lazy`), so that the NIfTI reader and writer stay free of torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .grids import canonical_layer, canonical_zyx, crop_grid, strided_grid, to_source_grid
from .volumes import Volume, read_volume, write_volume

_EXPORTS = {
    **dict.fromkeys(
        ("SAFE_GLOBALS", "LoadReport", "UnsafeCheckpointError", "default_checkpoint", "extract_state_dict",
         "imagenet_checkpoint", "load_model", "load_model_with_report", "load_state_dict_file",
         "named_checkpoint", "save_model", "strip_prefixes"),
        ".checkpoints",
    ),
    **dict.fromkeys(("ArchMatch", "KeyDiff", "detect_architecture", "match_architecture"), ".detect"),
}
__all__ = [
    "SAFE_GLOBALS",
    "ArchMatch",
    "KeyDiff",
    "LoadReport",
    "UnsafeCheckpointError",
    "Volume",
    "canonical_layer",
    "canonical_zyx",
    "crop_grid",
    "default_checkpoint",
    "detect_architecture",
    "extract_state_dict",
    "imagenet_checkpoint",
    "load_model",
    "load_model_with_report",
    "load_state_dict_file",
    "match_architecture",
    "named_checkpoint",
    "read_volume",
    "save_model",
    "strided_grid",
    "strip_prefixes",
    "to_source_grid",
    "write_volume",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what editors and type checkers resolve the lazy names to
    from .checkpoints import (
        SAFE_GLOBALS,
        LoadReport,
        UnsafeCheckpointError,
        default_checkpoint,
        extract_state_dict,
        imagenet_checkpoint,
        load_model,
        load_model_with_report,
        load_state_dict_file,
        named_checkpoint,
        save_model,
        strip_prefixes,
    )
    from .detect import ArchMatch, KeyDiff, detect_architecture, match_architecture
