"""Safe checkpoint reading and writing, architecture detection from state dicts, and volumes on disk."""

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
from .volumes import Volume, read_volume, write_volume

__all__ = [
    "SAFE_GLOBALS",
    "ArchMatch",
    "KeyDiff",
    "LoadReport",
    "UnsafeCheckpointError",
    "Volume",
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
    "strip_prefixes",
    "write_volume",
]
