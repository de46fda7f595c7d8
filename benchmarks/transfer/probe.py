"""Linear probe on frozen voxel features: multinomial logistic regression in torch, and Dice.

A probe measures what the features already separate: it learns one linear map from the
C feature channels to the classes on a small, fixed set of labelled voxels and is scored
on every other voxel of the volume. Few labelled voxels (tens per class) make the score
depend on the features rather than on the probe's capacity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["fit_logistic_regression", "linear_probe", "sample_labelled"]


def sample_labelled(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Flat indices of ``per_class`` voxels drawn at random from each class of ``labels``.

    Args:
        labels: integer label volume, every voxel labelled (classes 0..K-1).
        per_class: voxels per class; a class with fewer voxels gives all of them.
        seed: the draw's seed (one seed = one annotator's set of clicks).

    Returns:
        Sorted flat indices into ``labels``.
    """
    rng = np.random.default_rng(seed)
    flat = labels.ravel()
    chosen = []
    for cls in np.unique(flat):
        members = np.flatnonzero(flat == cls)
        chosen.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-3, iterations: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS (full batch; convex, so the solution is the optimum).

    Args:
        x: (N, C) standardised features.
        y: (N,) class indices.
        num_classes: K.
        weight_decay: L2 penalty on the weights (keeps the optimum finite on separable data).
        iterations: L-BFGS iterations.

    Returns:
        ``(weight (K, C), bias (K,))``.
    """
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    x64 = x.double()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x64 @ weight.T + bias, y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


def linear_probe(features: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Fit a probe on ``per_class`` voxels per class and predict every voxel.

    Args:
        features: (C, Z, Y, X) frozen features.
        labels: (Z, Y, X) integer labels 0..K-1 (every voxel labelled).
        per_class: labelled voxels per class used for fitting.
        seed: which voxels (see :func:`sample_labelled`).

    Returns:
        (Z, Y, X) predicted classes.
    """
    if features.shape[1:] != labels.shape:
        raise ValueError(f"features {features.shape} and labels {labels.shape} must share the volume grid.")
    channels = features.shape[0]
    flat = torch.from_numpy(features.reshape(channels, -1))
    train = torch.from_numpy(sample_labelled(labels, per_class, seed))
    x = flat[:, train].T
    # Standardise with the training voxels' statistics only (what a user's clicks provide).
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    y = torch.from_numpy(labels.ravel()[train.numpy()].astype(np.int64))
    weight, bias = fit_logistic_regression((x - mean) / std, y, int(labels.max()) + 1)
    predicted = np.empty(flat.shape[1], dtype=np.int64)
    for start in range(0, flat.shape[1], 1 << 18):  # blocks keep the standardised copy small
        block = (flat[:, start : start + (1 << 18)].T - mean) / std
        predicted[start : start + len(block)] = (block @ weight.T + bias).argmax(1).numpy()
    return predicted.reshape(labels.shape)
