"""2D data sets for pretraining: image folders, slices of labelled volumes, Fashion-MNIST.

Every data set here returns ``(image, label)`` with ``image`` a ``(3, S, S)`` float32
tensor scaled to [0, 1] (grey images repeated over three channels, so that the network
has the torchvision stem that 2D-pretrained weights and inflation expect) and ``label``
an int. Normalisation with the data set's mean and std happens in the training loop, so
the statistics can be recorded with the weights.

Augmentation (random shift by reflect-padding and cropping, horizontal flip) is drawn
from a generator seeded by ``(seed, epoch, index)``, not from the global RNG: an image
gets the same augmentation whichever DataLoader worker or rank loads it, which is what
makes a resumed run reproduce an uninterrupted one.
"""

from __future__ import annotations

import csv
import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from skimage import io as skio
from torch.utils.data import Dataset

from ..io.samples import FASHION_MNIST_ROOT
from ..io.volumes import read_volume

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGE_SUFFIXES",
    "FashionMNIST",
    "ImageFolder",
    "VolumeSlices",
    "open_dataset",
    "read_idx",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".nii.gz")
# idx type codes (http://yann.lecun.com/exdb/mnist/): code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzipped or not.

    Args:
        path: ``*-idx?-ubyte`` file, optionally ending in ``.gz``.

    Returns:
        The array with the shape and dtype the header declares (native byte order).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the header is not an idx header, or the payload size does not match it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an idx file: expected the magic bytes 00 00 <type> <ndim> with type one of "
            f"{', '.join(hex(t) for t in _IDX_DTYPES)}, got {data[:4].hex(' ') or 'an empty file'}."
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated idx header ({ndim} dimensions declared).")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = data[4 + 4 * ndim :]
    if len(payload) != expected:
        raise ValueError(f"{path}: header declares shape {shape} ({expected} bytes), file holds {len(payload)} bytes.")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _to_unit_range(array: np.ndarray) -> np.ndarray:
    """uint8 images / 255; anything else min-max scaled per image (16-bit microscopy rarely spans its range)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    lo, hi = float(array.min()), float(array.max())
    return (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)


def _to_chw3(image: np.ndarray, source: str) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) or (1|3, H, W) -> (3, H, W); alpha dropped, grey repeated."""
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = image[..., :3] if image.shape[-1] != 1 else image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[None], 3, axis=0)
    elif image.ndim == 3 and image.shape[-1] == 3:
        image = np.moveaxis(image, -1, 0)
    else:
        raise ValueError(
            f"{source}: expected a 2D image (H, W), (H, W, 1|3|4) or (1|3, H, W), got shape {image.shape}."
        )
    return np.ascontiguousarray(image)


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (3, size, size), antialiased bilinear (aspect ratio not kept: classes are whole images)."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _read_image(path: Path) -> np.ndarray:
    suffix = _suffix(path)
    if suffix in (".nii", ".nii.gz"):
        data = np.asanyarray(nib.load(path).dataobj)
        squeezed = np.squeeze(data)
        if squeezed.ndim != 2:
            raise ValueError(f"{path}: an image folder holds 2D NIfTI slices, got a volume of shape {data.shape}.")
        return squeezed
    if suffix in (".tif", ".tiff"):
        return tifffile.imread(path)
    return skio.imread(path)


class _Augmented(Dataset):
    """Base: reproducible per-sample augmentation seeded by (seed, epoch, index)."""

    def __init__(self, image_size: int, augment: bool, seed: int) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.classes: list[str] = []
        self.targets: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch`` (call before building each epoch's DataLoader iterator)."""
        self.epoch = epoch

    def _augment(self, image: torch.Tensor, index: int) -> torch.Tensor:
        if not self.augment:
            return image
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        pad = max(1, self.image_size // 8)
        shift = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
        padded = F.pad(image[None], (pad, pad, pad, pad), mode="reflect")[0]
        image = padded[:, shift[0] : shift[0] + self.image_size, shift[1] : shift[1] + self.image_size]
        if torch.rand((), generator=gen) < 0.5:
            image = image.flip(-1)
        return image.contiguous()

    def _image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._augment(self._image(index), index), self.targets[index]

    def __len__(self) -> int:
        return len(self.targets)

    def mean_std(self, max_images: int = 2000) -> tuple[float, float]:
        """Mean and std of the un-augmented images (an evenly spaced sample of at most ``max_images``)."""
        indices = np.linspace(0, len(self) - 1, min(len(self), max_images)).round().astype(int)
        pixels = torch.stack([self._image(int(i))[0] for i in np.unique(indices)])
        return float(pixels.mean()), float(pixels.std())


class FashionMNIST(_Augmented):
    """Fashion-MNIST (Xiao et al., 2017): 60,000 train and 10,000 test 28x28 grey images, 10 classes.

    Reads the idx files of the Debian package ``dataset-fashion-mnist``
    (``apt-get install dataset-fashion-mnist``) or any folder holding
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

    Args:
        root: folder with the idx files (default: the Debian package's).
        split: ``"train"`` or ``"test"``.
        image_size: side of the returned images (28 keeps the native size).
        augment: random shift and horizontal flip.
        seed: augmentation seed.
        limit: keep a class-stratified random subset of this many images (None: all).
    """

    def __init__(
        self,
        root: str | Path = FASHION_MNIST_ROOT,
        split: str = "train",
        *,
        image_size: int = 28,
        augment: bool = False,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__(image_size, augment, seed)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        root = Path(root)
        prefix = "train" if split == "train" else "t10k"
        files = {}
        for kind, stem in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
            found = [root / name for name in (stem, stem + ".gz") if (root / name).is_file()]
            if not found:
                raise FileNotFoundError(
                    f"Fashion-MNIST {split} {kind} not found in {root} (expected {stem}[.gz]); "
                    "install them with: apt-get install dataset-fashion-mnist"
                )
            files[kind] = found[0]
        images, labels = read_idx(files["images"]), read_idx(files["labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{root}: expected (N, H, W) images and N labels, got {images.shape} and {labels.shape}.")
        keep = _stratified_subset(labels, limit, seed)
        self.images = torch.from_numpy(images[keep].copy())  # uint8, (N, 28, 28): 47 MB for all 60,000
        self.targets = labels[keep].astype(np.int64).tolist()
        self.classes = list(FASHION_MNIST_CLASSES)

    def _image(self, index: int) -> torch.Tensor:
        image = (self.images[index].float() / 255.0).expand(3, -1, -1)
        return _resize(image, self.image_size)


def _stratified_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of ``limit`` samples with the class proportions kept, sorted."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    if limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # Round-robin over classes in a random order: every class gets its share of the subset.
    ranks = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        ranks[members] = np.arange(len(members)) * len(labels) // max(len(members), 1)
    keep = np.argsort(ranks, kind="stable")[:limit]
    return np.sort(keep)


class ImageFolder(_Augmented):
    """Images sorted into one folder per class: ``root/<class>/<image>``.

    PNG, JPEG, TIFF and 2D NIfTI (``.nii``/``.nii.gz`` with one non-singleton axis pair)
    files are read; grey images are repeated over three channels, RGBA loses alpha,
    uint8 images are divided by 255 and other types min-max scaled per image, and every
    image is resized to ``image_size`` squared.

    Args:
        root: folder with one sub-folder per class (sorted names give the class indices).
        image_size: side of the returned images.
        augment: random shift and horizontal flip.
        seed: augmentation seed.

    Raises:
        ValueError: ``root`` has no class folders, or a class folder holds no image.
    """

    def __init__(self, root: str | Path, *, image_size: int = 64, augment: bool = False, seed: int = 0) -> None:
        super().__init__(image_size, augment, seed)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise ValueError(f"{root} has no class folders: expected {root}/<class name>/<image files>.")
        self.files: list[Path] = []
        for index, name in enumerate(self.classes):
            files = sorted(p for p in (root / name).rglob("*") if p.is_file() and _suffix(p) in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"class folder {root / name} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
            self.files += files
            self.targets += [index] * len(files)

    def _image(self, index: int) -> torch.Tensor:
        path = self.files[index]
        image = _to_chw3(_to_unit_range(_read_image(path)), str(path))
        return _resize(torch.from_numpy(image), self.image_size)


class VolumeSlices(_Augmented):
    """2D slices of labelled volumes: every volume has one class, and each of its slices inherits it.

    The list is a CSV file with a header ``path,label`` (relative paths are relative to
    the list file): NIfTI volumes are reoriented to the closest canonical (RAS) axes,
    3D TIFF stacks are read as they are. Each volume is scaled to [0, 1] between its 0.5
    and 99.5 percentiles; slices along ``axes`` every ``step`` voxels are kept unless
    nearly empty (fewer than 5 % of pixels above 0.05), and are resized to ``image_size``.

    Args:
        listing: the CSV file.
        axes: volume axes to slice along (slicing along all three teaches every orientation).
        step: keep every ``step``-th slice.
        image_size: side of the returned images.
        augment: random shift and horizontal flip.
        seed: augmentation seed.

    Raises:
        ValueError: a malformed list, a volume that is not 3D, or no slice left.
    """

    def __init__(
        self,
        listing: str | Path,
        *,
        axes: Sequence[int] = (0, 1, 2),
        step: int = 1,
        image_size: int = 64,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(image_size, augment, seed)
        listing = Path(listing)
        if not listing.is_file():
            raise FileNotFoundError(f"volume list not found: {listing}")
        if step < 1 or not axes or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"expected step >= 1 and axes from (0, 1, 2), got step={step}, axes={tuple(axes)}.")
        with listing.open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if any(v.strip() for v in row.values() if v)]
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise ValueError(f"{listing}: expected a CSV with a header 'path,label' and one volume per row.")
        self.classes = sorted({row["label"].strip() for row in rows})
        slices: list[torch.Tensor] = []
        for row in rows:
            path = Path(row["path"].strip())
            path = path if path.is_absolute() else listing.parent / path
            volume = np.asarray(read_volume(path).data, dtype=np.float32)
            lo, hi = np.percentile(volume, (0.5, 99.5))
            volume = np.clip((volume - lo) / max(hi - lo, 1e-8), 0, 1).astype(np.float32)
            label = self.classes.index(row["label"].strip())
            for axis in axes:
                for i in range(0, volume.shape[axis], step):
                    plane = np.take(volume, i, axis=axis)
                    if (plane > 0.05).mean() < 0.05:
                        continue
                    image = torch.from_numpy(np.ascontiguousarray(plane)).expand(3, -1, -1)
                    slices.append(_resize(image, image_size)[0].to(torch.float16))
                    self.targets.append(label)
        if not slices:
            raise ValueError(f"{listing}: no slice with content left (every slice was nearly empty).")
        # One channel in half precision: slices of a few 256^3 volumes stay well under 1 GB.
        self.slices = torch.stack(slices)

    def _image(self, index: int) -> torch.Tensor:
        return self.slices[index].float().expand(3, -1, -1)


def open_dataset(
    data: str | Path,
    split: str = "train",
    *,
    image_size: int | None = None,
    augment: bool = False,
    seed: int = 0,
    limit: int | None = None,
) -> _Augmented:
    """Open pretraining data by what ``data`` is.

    Args:
        data: ``"fashion-mnist"`` (the Debian package's files) or a folder holding
            Fashion-MNIST idx files; a ``.csv`` volume list (:class:`VolumeSlices`); or an
            image folder with one sub-folder per class (:class:`ImageFolder`).
        split: ``"train"`` or ``"test"``; only Fashion-MNIST has a built-in test split.
        image_size: image side (default: 28 for Fashion-MNIST, 64 otherwise).
        augment: random shift and horizontal flip (training).
        seed: augmentation and subset seed.
        limit: Fashion-MNIST only: a class-stratified subset of this many images.

    Returns:
        The data set, with ``classes`` and ``targets`` attributes.
    """
    path = Path(data)
    is_fmnist = str(data) == "fashion-mnist" or (path.is_dir() and any(path.glob("train-images-idx3-ubyte*")))
    if is_fmnist:
        root = FASHION_MNIST_ROOT if str(data) == "fashion-mnist" else path
        return FashionMNIST(root, split, image_size=image_size or 28, augment=augment, seed=seed, limit=limit)
    if split != "train":
        raise ValueError(f"{data}: only Fashion-MNIST has a built-in test split; pass a validation set explicitly.")
    if limit is not None:
        raise ValueError("limit applies to Fashion-MNIST only.")
    if path.suffix.lower() == ".csv":
        return VolumeSlices(path, image_size=image_size or 64, augment=augment, seed=seed)
    if path.is_dir():
        return ImageFolder(path, image_size=image_size or 64, augment=augment, seed=seed)
    raise FileNotFoundError(
        f"pretraining data {data!r} not found: expected 'fashion-mnist', a folder with one sub-folder per class, "
        "or a .csv volume list (columns path,label)."
    )
