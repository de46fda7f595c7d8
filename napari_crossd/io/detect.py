"""Recognise which registered architecture a state dict belongs to, from keys and shapes.

Every candidate in :data:`napari_crossd.models.ARCHITECTURES` is built once on the
``meta`` device (no memory, no initialisation cost) to obtain its key -> shape table;
a checkpoint matches when its tensors and the table agree exactly, apart from the
number of classes in the head. A Cross-D architecture has two layouts: this project's
(1x1 convolutions plain) and the official code's (every convolution Cross-D, see
:mod:`napari_crossd.models.crossd`); both are tried. Official checkpoints may also hold
tensors that the official evaluation drops before loading (:data:`OFFICIAL_EXTRA_WORDS`):
those are set aside as ``ignored``, not counted against a match.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

import torch

from napari_crossd.models.crossd import convert_to_crossd
from napari_crossd.models.registry import ARCHITECTURES, CROSSD_PREFIX, build_model, head_name

__all__ = [
    "OFFICIAL_EXTRA_WORDS",
    "ArchMatch",
    "KeyDiff",
    "detect_architecture",
    "detect_rotation",
    "diff_state_dict",
    "match_architecture",
]

# BatchNorm's step counter: old checkpoints (e.g. torchvision's resnet18-5c106cde.pth)
# lack it and BatchNorm fills it in on load, so it never decides a match.
_IGNORED_SUFFIX = "num_batches_tracked"
_SHOW = 5  # how many keys of each kind an error message lists
# The official evaluation scripts (_eval/_weak_probing/weak_training_mri.py in
# convergedmachine/Cross-D-Conv) load Cross-D checkpoints with strict=False after dropping
# every key containing one of these words: released checkpoints may hold such tensors
# (from variants with dilated branches or learned angles) that no model here has.
OFFICIAL_EXTRA_WORDS = ("rotation", "angle", "dilated_conv", "bn_dilated")


@dataclass
class KeyDiff:
    """How a state dict differs from the keys/shapes a model expects.

    Attributes:
        matched: number of keys present on both sides with equal shapes.
        missing: keys the model expects that the state dict lacks.
        unexpected: keys in the state dict that the model does not have.
        mismatched: ``(key, checkpoint shape, expected shape)`` for keys in both.
        ignored: keys in the state dict that the model does not have but that are known
            extras (see :func:`diff_state_dict`); they do not spoil an exact match.
    """

    matched: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when the state dict loads strictly once the ignored keys are left out."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def score(self) -> float:
        """Share of keys that agree, over the union of both key sets (1.0 = exact)."""
        total = self.matched + len(self.missing) + len(self.unexpected) + len(self.mismatched)
        return self.matched / total if total else 0.0

    def describe(self) -> str:
        """Counts and a few examples of each kind of disagreement, for error messages."""
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
                parts.append(f"{len(keys)} {label} key(s): {', '.join(keys[:_SHOW])}{more}")
        if self.mismatched:
            shown = "; ".join(
                f"{k}: checkpoint {tuple(a)} vs expected {tuple(b)}" for k, a, b in self.mismatched[:_SHOW]
            )
            more = f"; ... ({len(self.mismatched) - _SHOW} more)" if len(self.mismatched) > _SHOW else ""
            parts.append(f"{len(self.mismatched)} shape mismatch(es): {shown}{more}")
        return "; ".join(parts) if parts else "all keys match"


@dataclass
class ArchMatch:
    """Result of comparing a state dict with one registered architecture.

    Attributes:
        arch: the architecture name, e.g. ``"crossd_resnet18"``.
        num_classes: head width read from the state dict (``None`` if the head is absent).
        rotation: Cross-D rotation type for ``crossd_*`` architectures, else ``None``.
        diff: the key/shape comparison.
        pointwise: the official layout, 1x1 convolutions Cross-D too (``crossd_*`` only).
    """

    arch: str
    num_classes: int | None
    rotation: str | None
    diff: KeyDiff
    pointwise: bool = False


def detect_rotation(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Cross-D rotation type from parameter names.

    Returns:
        ``"dynamic"`` if any key contains ``rotation_params`` (the per-input predictor),
        ``"static"`` if any key ends in ``rotation_vector``, else ``"none"``.
    """
    if any(".rotation_params." in f".{k}" for k in state_dict):
        return "dynamic"
    if any(k.endswith("rotation_vector") for k in state_dict):
        return "static"
    return "none"


def diff_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    head: str | None = None,
    extra_words: tuple[str, ...] = (),
) -> KeyDiff:
    """Compare a state dict with expected key -> shape pairs.

    Args:
        state_dict: the tensors to check.
        expected: key -> shape of the model they should load into.
        head: dotted name of the classification head; its leading (class) dimension
            is not compared, so that any ``num_classes`` matches.
        extra_words: a state-dict key the model lacks that contains one of these words is
            ``ignored`` rather than ``unexpected`` (e.g. :data:`OFFICIAL_EXTRA_WORDS`).

    Returns:
        The :class:`KeyDiff`; ``num_batches_tracked`` keys are left out of the comparison
        on both sides (the model's own are filled in by BatchNorm, surplus ones ignored).
    """
    head_keys = {f"{head}.weight", f"{head}.bias"} if head else set()
    diff = KeyDiff()
    for key, shape in expected.items():
        if key.endswith(_IGNORED_SUFFIX):
            continue
        if key not in state_dict:
            diff.missing.append(key)
            continue
        got = tuple(state_dict[key].shape)
        same = got[1:] == tuple(shape)[1:] if key in head_keys else got == tuple(shape)
        if same:
            diff.matched += 1
        else:
            diff.mismatched.append((key, got, tuple(shape)))
    for key in state_dict:
        if key in expected:
            continue
        if any(word in key for word in extra_words):
            diff.ignored.append(key)
        elif not key.endswith(_IGNORED_SUFFIX):
            diff.unexpected.append(key)
    return diff


@cache
def _expected_shapes(arch: str, rotation: str | None, pointwise: bool = False) -> dict[str, tuple[int, ...]]:
    # The meta device allocates nothing, so even ResNet-50 builds in milliseconds.
    with torch.device("meta"):
        model = build_model(arch, rotation=rotation) if rotation else build_model(arch)
        if pointwise:
            convert_to_crossd(model, rotation, pointwise=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_architecture(state_dict: Mapping[str, torch.Tensor], arch: str) -> ArchMatch:
    """Compare a state dict with one registered architecture.

    Args:
        state_dict: flat key -> tensor mapping (prefixes already stripped).
        arch: a name from :data:`napari_crossd.models.ARCHITECTURES`.

    Returns:
        The :class:`ArchMatch`; for ``crossd_*`` the rotation type is read from the keys,
        both layouts are compared (the closer one is returned) and
        :data:`OFFICIAL_EXTRA_WORDS` keys are ignored.
    """
    head = head_name(arch)
    head_weight = state_dict.get(f"{head}.weight")
    num_classes = int(head_weight.shape[0]) if head_weight is not None else None
    if not arch.startswith(CROSSD_PREFIX):
        return ArchMatch(arch, num_classes, None, diff_state_dict(state_dict, _expected_shapes(arch, None), head))
    rotation = detect_rotation(state_dict)
    layouts = []
    for pointwise in (False, True):
        expected = _expected_shapes(arch, rotation, pointwise)
        diff = diff_state_dict(state_dict, expected, head, OFFICIAL_EXTRA_WORDS)
        layouts.append(ArchMatch(arch, num_classes, rotation, diff, pointwise))
    return max(layouts, key=lambda m: m.diff.score)


def detect_architecture(state_dict: Mapping[str, torch.Tensor]) -> ArchMatch:
    """Find the registered architecture whose parameters a state dict holds exactly.

    Cross-D checkpoints are recognised by their ``weights_3d`` kernels (with 1x1 layers
    plain or Cross-D), the rotation type by ``rotation_params`` / ``rotation_vector``, and
    ``num_classes`` by the head shape.

    Args:
        state_dict: flat key -> tensor mapping (prefixes already stripped).

    Returns:
        The exact :class:`ArchMatch`.

    Raises:
        ValueError: no architecture matches; the message names the closest one and its
            missing, unexpected and mis-shaped keys.
    """
    if not state_dict:
        raise ValueError("The state dict is empty: there are no tensors to match.")
    matches = [match_architecture(state_dict, arch) for arch in ARCHITECTURES]
    best = max(matches, key=lambda m: m.diff.score)
    if best.diff.exact:
        return best
    expected = best.diff.matched + len(best.diff.missing) + len(best.diff.mismatched)
    raise ValueError(
        f"The checkpoint's {len(state_dict)} tensors match none of the known architectures "
        f"({', '.join(ARCHITECTURES)}). Closest: {best.arch} "
        f"({best.diff.matched} of {expected} expected tensors agree); {best.diff.describe()}."
    )
