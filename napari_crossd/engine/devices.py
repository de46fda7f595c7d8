"""Where the work runs: device choice, mixed precision, and out-of-memory detection."""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch

__all__ = ["DEVICES", "autocast", "is_out_of_memory", "release_memory", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a user's device choice into a :class:`torch.device`.

    Args:
        device: ``"auto"`` (CUDA if present, else Apple MPS, else CPU), ``"cpu"``,
            ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a :class:`torch.device`.

    Raises:
        ValueError: the device is unknown or not available on this machine.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"Unknown device {device!r}; expected one of {', '.join(DEVICES)}.") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("Device 'cuda' was requested but torch sees no CUDA GPU here; use --device cpu or auto.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"Device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s).")
    elif resolved.type == "mps" and not _mps_available():
        raise ValueError("Device 'mps' was requested but Apple MPS is not available here; use --device cpu or auto.")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Unsupported device {device!r}; expected one of {', '.join(DEVICES)}.")
    return resolved


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA (tensor cores, half the activation memory); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def is_out_of_memory(err: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA raises ``OutOfMemoryError``, MPS a RuntimeError)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def release_memory(device: torch.device) -> None:
    """Give cached device memory back, so that other programs (and napari) can use it.

    On the CPU that is the C heap: glibc keeps freed blocks of tens of MB (a tile's
    activations, a block's filter responses) in its arenas, where they count against the
    process for as long as it lives; ``malloc_trim`` returns them, as Dask's workers do.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
    _trim_c_heap()


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to trim
        return None


def _trim_c_heap() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
