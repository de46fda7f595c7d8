"""Safe checkpoint reading and writing, and architecture detection from state dicts."""

from .checkpoints import (
    SAFE_GLOBALS,
    UnsafeCheckpointError,
    default_checkpoint,
    extract_state_dict,
    load_model,
    load_state_dict_file,
    save_model,
    strip_prefixes,
)
from .detect import ArchMatch, KeyDiff, detect_architecture, match_architecture

__all__ = [
    "SAFE_GLOBALS",
    "ArchMatch",
    "KeyDiff",
    "UnsafeCheckpointError",
    "default_checkpoint",
    "detect_architecture",
    "extract_state_dict",
    "load_model",
    "load_state_dict_file",
    "match_architecture",
    "save_model",
    "strip_prefixes",
]
