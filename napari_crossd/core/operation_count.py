"""Counting compute operations: how many kernels a step launches on a GPU.

Cross-D layers build their kernels from many small tensor operations; on a GPU each is a
launch, and a layer is launch-bound long before it is compute-bound. The tests bound the
count per layer and the benchmarks report it beside the times, with this one counter.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ComputeOperations", "compute_operations"]


class ComputeOperations(TorchDispatchMode):
    """Counts every ATen call that is not a view: each is a dispatch on a CPU, a launch on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def compute_operations(step: Callable[[], object]) -> int:
    """The compute operations that ``step()`` dispatches.

    Example:
        >>> import torch
        >>> x = torch.ones(3, requires_grad=True)
        >>> compute_operations(lambda: (x * 2).sum().backward()) > 0
        True
    """
    with ComputeOperations() as counter:
        step()
    return counter.count
