"""The torch filter bank against scipy / scikit-image on real volumes, and tile by tile.

Tolerances are relative to each channel's response scale (its largest absolute value on
the crop): float32 rounding gives ~1e-6 of it; the tests allow 1e-5.
"""

from __future__ import annotations

import doctest
from itertools import product

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from skimage.feature import hessian_matrix, hessian_matrix_eigvals, structure_tensor_eigenvalues

from napari_crossd.engine import filters
from napari_crossd.engine.filters import (
    DEFAULT_SIGMAS,
    filter_bank,
    filter_box,
    filter_halo,
    filter_names,
    symmetric_eigenvalues,
)

RTOL = 1e-5  # of the channel's response scale
SECOND = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # skimage's (rc) order of the upper triangle


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    """A real T1 MRI crop (40^3 voxels of 1 mm across grey/white matter and CSF), float64 in [0, 1]."""
    from napari_crossd.datasets import load_mni152

    try:
        image = load_mni152().image
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    return image[80:120, 90:130, 70:110].astype(np.float64) / 255


@pytest.fixture(scope="module")
def bank(t1) -> torch.Tensor:
    return filter_bank(torch.from_numpy(t1).float())


def _close(actual: torch.Tensor, reference: np.ndarray, rtol: float = RTOL) -> float:
    """Largest error relative to the reference's scale; asserts it is below ``rtol``."""
    error = np.abs(actual.double().numpy() - reference).max() / np.abs(reference).max()
    assert error < rtol, f"error {error:.2e} of the response scale"
    return error


def _scipy(image: np.ndarray, sigma: float, order) -> np.ndarray:
    """scipy's Gaussian derivative, with the second-derivative DC removed as filters.py does.

    Removing the DC d from the kernel of d2/dz2 subtracts d * (the Gaussian-smoothed image);
    d is the kernel's sum, i.e. the filter's response to a constant 1.
    """
    out = ndi.gaussian_filter(image, sigma, order=order, mode="nearest", truncate=4.0)
    if 2 in order:
        dc = ndi.gaussian_filter1d(np.ones(1), sigma, order=2, mode="nearest", truncate=4.0)[0]
        out -= dc * ndi.gaussian_filter(image, sigma, mode="nearest", truncate=4.0)
    return out


def _channel(bank: torch.Tensor, name: str) -> torch.Tensor:
    return bank[filter_names().index(name)]


def _channels(bank: torch.Tensor, family: str, sigma: float) -> torch.Tensor:
    return torch.stack([_channel(bank, f"{family}_eig{i} s={sigma:g}") for i in (1, 2, 3)])


def test_names_shapes_and_halo(bank, t1):
    names = filter_names()
    assert len(names) == bank.shape[0] == 1 + 9 * len(DEFAULT_SIGMAS) == 37
    assert len(set(names)) == len(names) and names[0] == "intensity" and "hessian_eig1 s=2" in names
    assert bank.shape[1:] == t1.shape and bank.dtype == torch.float32
    np.testing.assert_array_equal(bank[0].numpy(), t1.astype(np.float32))
    assert filter_halo() == 48  # structure tensor at sigma 8: radius 16 (inner) + 32 (outer)
    assert filter_halo((1.0, 8.0), ("gaussian", "log")) == 32
    # Sets come out in FILTER_SETS order, whatever order they were asked in.
    assert filter_names((1.0,), ("log", "gaussian")) == ["intensity", "gaussian s=1", "log s=1"]
    assert filter_bank(torch.from_numpy(t1[:5, :6, :7]).float(), sets=()).shape == (1, 5, 6, 7)


def test_one_stage_families_match_scipy(bank, t1):
    for sigma in DEFAULT_SIGMAS:
        _close(_channel(bank, f"gaussian s={sigma:g}"), ndi.gaussian_filter(t1, sigma, mode="nearest", truncate=4.0))
        gradient = ndi.gaussian_gradient_magnitude(t1, sigma, mode="nearest", truncate=4.0)
        _close(_channel(bank, f"gradient s={sigma:g}"), gradient)
        log = _scipy(t1, sigma, (2, 0, 0)) + _scipy(t1, sigma, (0, 2, 0)) + _scipy(t1, sigma, (0, 0, 2))
        _close(_channel(bank, f"log s={sigma:g}"), log)
        # The DC removal is the only difference from scipy's own Laplacian: scipy's
        # brightness-proportional bias, measured 0.08% (sigma 1) to 1% (sigma 8) of the response.
        _close(_channel(bank, f"log s={sigma:g}"), ndi.gaussian_laplace(t1, sigma, mode="nearest"), rtol=2e-2)


def test_hessian_matches_scipy_entries_and_skimage_eigenvalues(bank, t1):
    for sigma in DEFAULT_SIGMAS:
        entries = [_scipy(t1, sigma, tuple(int(a == i) + int(b == i) for i in range(3))) for a, b in SECOND]
        _close(_channels(bank, "hessian", sigma), hessian_matrix_eigvals(entries))


def test_hessian_near_skimage_hessian_matrix(bank, t1):
    # skimage's Gaussian-derivative Hessian smooths twice at sigma / sqrt(2), truncated at
    # 8 sigma, and extends the first derivative (not the grey values) at the borders:
    # comparable away from the borders. At sigma 1 two sampled first-derivative kernels of
    # sigma 0.71 differ from one sampled second-derivative kernel (4.4% measured); by
    # sigma 2 that has faded (0.08%).
    for sigma, rtol in ((1.0, 6e-2), (2.0, 2e-3)):
        inner = (slice(int(8 * sigma), -int(8 * sigma)),) * 3
        entries = hessian_matrix(t1, sigma, mode="nearest", use_gaussian_derivatives=True)
        reference = hessian_matrix_eigvals([e[inner] for e in entries])
        _close(_channels(bank, "hessian", sigma)[(slice(None), *inner)], reference, rtol=rtol)


def test_structure_tensor_matches_scipy_and_skimage_eigenvalues(bank, t1):
    # Reference of the module's convention: gradient at sigma / 2 of the nearest-extended
    # volume, products smoothed at sigma. (skimage.feature.structure_tensor differentiates
    # with Sobel filters, a different operator: its eigenvalue routine is what compares.)
    halo = filter_halo()
    extended = np.pad(t1, halo, mode="edge")
    inner = (slice(halo, -halo),) * 3
    for sigma in DEFAULT_SIGMAS:
        gradient = [ndi.gaussian_filter(extended, sigma / 2, order=o, truncate=4.0) for o in np.eye(3, dtype=int)]
        tensor = [ndi.gaussian_filter(gradient[a] * gradient[b], sigma, truncate=4.0)[inner] for a, b in SECOND]
        _close(_channels(bank, "structure", sigma), structure_tensor_eigenvalues(tensor))


def test_symmetric_eigenvalues_match_lapack_and_survive_degenerate_matrices():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5000, generator=generator)
    a[:, :100] = torch.tensor([0.3, 0.3, 0.3, 0.0, 0.0, 0.0])[:, None]  # multiples of the identity
    a[:, 100:200] = torch.tensor([1.0, 1.0, 2.0, 1e-4, 0.0, 0.0])[:, None]  # a nearly double eigenvalue
    a[:, 200:300] = 0
    zz, yy, xx, zy, zx, yx = a.double().numpy()
    matrices = np.stack([np.stack([zz, zy, zx], -1), np.stack([zy, yy, yx], -1), np.stack([zx, yx, xx], -1)], -2)
    reference = np.linalg.eigvalsh(matrices)[:, ::-1].T
    eigenvalues = symmetric_eigenvalues(a)
    assert eigenvalues.dtype == torch.float32 and torch.isfinite(eigenvalues).all()
    np.testing.assert_allclose(eigenvalues.numpy(), reference, atol=1e-6 * np.abs(reference).max())


def test_tiles_equal_the_whole_volume(bank, t1):
    # Uneven tiles: every one touches some borders of the volume (halo 48 > the crop).
    volume = torch.from_numpy(t1).float()
    edges = [(0, 17), (17, 40)]
    for box in product(*[[slice(a, b) for a, b in edges]] * 3):
        part = filter_box(volume.__getitem__, volume.shape, box)
        scale = bank.flatten(1).abs().amax(1)[:, None, None, None]
        assert ((part - bank[(slice(None), *box)]).abs() / scale).max() < RTOL, box


def test_inner_tiles_of_real_nuclei_equal_the_whole_volume():
    # Smaller sigmas (halo 12) on a 48^3 confocal crop: the centre tile reads no border,
    # the corner tiles read two or three, the last one mixes both.
    from napari_crossd.datasets import load_nuclei

    try:
        image = load_nuclei().image[6:54, 100:148, 100:148].astype(np.float32)
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    volume = torch.from_numpy((image - image.min()) / (image.max() - image.min()))
    sigmas = (1.0, 2.0)
    whole = filter_bank(volume, sigmas)
    scale = whole.flatten(1).abs().amax(1)[:, None, None, None]
    reads = []

    def read(slices):
        reads.append(slices)
        return volume[slices]

    low, middle, high = slice(0, 14), slice(14, 33), slice(33, 48)
    for box in [(middle,) * 3, (low,) * 3, (high,) * 3, (low, middle, high)]:
        part = filter_box(read, volume.shape, box, sigmas)
        assert ((part - whole[(slice(None), *box)]).abs() / scale).max() < RTOL, box
    assert (slice(2, 45), slice(2, 45), slice(2, 45)) in reads  # the centre tile grown by 12, unclipped


def test_constant_volume_gives_finite_zero_derivatives():
    bank = filter_bank(torch.full((12, 13, 14), 0.7))
    assert torch.isfinite(bank).all()
    for name, channel in zip(filter_names(), bank, strict=True):
        expected = 0.7 if name == "intensity" or name.startswith("gaussian") else 0.0
        assert (channel - expected).abs().max() < 1e-6, name


def test_small_volume_smaller_than_the_halo():
    volume = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(1))
    bank = filter_bank(volume, (2.0,))
    reference = ndi.gaussian_gradient_magnitude(volume.double().numpy(), 2.0, mode="nearest", truncate=4.0)
    _close(bank[filter_names((2.0,)).index("gradient s=2")], reference)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: filter_bank(torch.zeros(4, 4)), r"3D tensor of shape \(Z, Y, X\), got \(4, 4\)"),
        (lambda: filter_bank(np.zeros((4, 4, 4), np.float32)), "torch.Tensor.*got ndarray.*torch.from_numpy"),
        (lambda: filter_bank(torch.zeros(4, 4, 4, dtype=torch.int32)), "floating-point.*torch.int32"),
        (lambda: filter_bank(torch.zeros(4, 4, 4), sigmas=(1.0, 0.0)), r"positive, finite sigmas.*\(1.0, 0.0\)"),
        (lambda: filter_bank(torch.zeros(4, 4, 4), sigmas=(-1.0,)), "positive, finite sigmas"),
        (lambda: filter_names(sigmas=()), "one or more positive"),
        (lambda: filter_bank(torch.zeros(4, 4, 4), sets=("hessian", "dog")), r"\['dog'\].*'gaussian'"),
        (lambda: filter_halo(sets="sobel"), r"Unknown filter set\(s\) \['sobel'\]"),
        (lambda: filter_box(torch.zeros(8, 8, 8).__getitem__, (8, 8), (slice(0, 4),) * 3), "three positive sizes"),
        (lambda: filter_box(torch.zeros(8, 8, 8).__getitem__, (8, 8, 8), (slice(0, 4),) * 2), "three slices"),
        (lambda: filter_box(torch.zeros(8, 8, 8).__getitem__, (8, 8, 8), (slice(4, 4),) * 3), "non-empty box"),
        (lambda: filter_box(lambda s: torch.zeros(2, 2, 2), (8, 8, 8), (slice(0, 4),) * 3), r"expected \(8, 8, 8\)"),
    ],
)
def test_bad_input_names_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_docstring_examples_run():
    assert doctest.testmod(filters).failed == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(t1):
    volume = torch.from_numpy(t1[:24, :24, :24]).float()
    on_cpu = filter_bank(volume)
    on_cuda = filter_bank(volume.cuda())
    assert on_cuda.device.type == "cuda"
    scale = on_cpu.flatten(1).abs().amax(1)[:, None, None, None]
    # cuDNN may run the convolutions in TF32 (10-bit mantissa): ~1e-3, not float32 rounding.
    assert ((on_cuda.cpu() - on_cpu).abs() / scale).max() < 2e-3
