"""Image datasets as tensors: scikit-learn's digits, MNIST and Fashion-MNIST IDX files, a folder.

:func:`load_images` returns :class:`ImageData`: ``train`` and ``val`` are float32 tensors
``[N, C, H, W]`` with values in ``[0, 1]``, with their class labels (LongTensor ``[N]``, or None).

- ``digits``: the 1,797 8x8 digits bundled with scikit-learn (values 0..16, divided by 16; no
  download), split by ``val_fraction`` with a permutation seeded by ``seed``.
- ``mnist`` / ``fashion-mnist``: the four IDX files of the dataset in ``images.folder``
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally gzipped as ``NAME.gz``); the 60,000 training images
  train and the 10,000 test images validate, whatever ``val_fraction``. Values are bytes / 255.
- ``folder``: every ``.png``, ``.jpg`` and ``.jpeg`` under ``images.folder`` (recursively, sorted
  by path), resized to ``images.size`` square and read as RGB (3 channels) or, with
  ``images.grayscale``, one channel. When every image sits in a subfolder, the first-level
  subfolder names (sorted) are the classes and their positions the labels; otherwise there are
  no labels. Split by ``val_fraction`` like digits.

``images.size`` also resizes digits and MNIST (bilinear, antialiased when shrinking).

The IDX format (LeCun et al., the MNIST files): two zero bytes, a type byte (0x08 uint8,
0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), a byte with the number of
dimensions ``n``, ``n`` big-endian uint32 sizes, then the values, big-endian, row-major.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pips.config import ImageConfig


class ImageDataError(ValueError):
    """An image dataset that cannot be read; the message names the folder or file and the fix."""


class ImageData(NamedTuple):
    train: torch.Tensor  # [N, C, H, W] float32 in [0, 1]
    val: torch.Tensor  # [M, C, H, W] float32 in [0, 1]
    train_labels: torch.Tensor | None  # [N] long, or None
    val_labels: torch.Tensor | None  # [M] long, or None
    name: str  # digits, mnist, fashion-mnist, or folder:<the folder's name>
    classes: tuple[str, ...] | None = None  # folder: the class (subfolder) names, in label order

    @property
    def channels(self) -> int:
        return self.train.shape[1]

    @property
    def image_size(self) -> int:
        """The side of the (square) images."""
        return self.train.shape[-1]


# ------------------------------------------------------------------------------------- IDX files

_IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("=").str[1:]: code for code, dtype in _IDX_TYPES.items()}


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped when its name ends in ``.gz``) as a numpy array of its shape and type
    (native byte order)."""
    path = Path(path)
    with _open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ImageDataError(
            f"{path} is not an IDX file (it should start with two zero bytes and a type byte); "
            "replace it with the dataset's original file"
        )
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = int(np.prod(shape)) if ndim else 1
    offset = 4 + 4 * ndim
    if len(data) - offset != count * dtype.itemsize:
        raise ImageDataError(
            f"{path} holds {len(data) - offset} bytes of values but its header {shape} needs "
            f"{count * dtype.itemsize}; the file is truncated, so download it again"
        )
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return values.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8, int8, int16, int32, float32 or float64) as an IDX file, gzipped
    when ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=").str[1:]
    if key not in _IDX_CODES:
        raise ValueError(
            f"IDX files hold uint8, int8, int16, int32, float32 or float64; got {array.dtype}, "
            "so cast the array to one of them"
        )
    code = _IDX_CODES[key]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with _open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).tobytes())


# ------------------------------------------------------------------------------------- datasets

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
IDX_SOURCES = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (a mirror of yann.lecun.com/exdb/mnist)",
    "fashion-mnist": "https://github.com/zalandoresearch/fashion-mnist (its data/fashion folder)",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C, size, size]`` bilinear (antialiased), clamped to ``[0, 1]``;
    unchanged when ``size`` is None or already the size."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    resized = F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.clamp(0.0, 1.0)


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index tensors of a seeded permutation of ``range(count)``; the validation
    share is ``round(count * val_fraction)`` items (sorted, so their order is the files')."""
    permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val_count = int(round(count * val_fraction))
    return permutation[val_count:].sort().values, permutation[:val_count].sort().values


def _split(
    images: torch.Tensor, labels: torch.Tensor | None, config: ImageConfig, seed: int, name: str
) -> ImageData:
    train, val = split_indices(images.shape[0], config.val_fraction, seed)
    return ImageData(
        images[train],
        images[val],
        None if labels is None else labels[train],
        None if labels is None else labels[val],
        name,
    )


def load_digits_images(config: ImageConfig, seed: int = 0) -> ImageData:
    """scikit-learn's 1,797 8x8 digits: ``[N, 1, 8, 8]`` (or ``images.size``), values / 16."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    return _split(resize(images, config.size), labels, config, seed, "digits")


def _idx_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx_images(config: ImageConfig, dataset: str) -> ImageData:
    """MNIST or Fashion-MNIST from the four IDX files in ``images.folder``: train = the train
    files, val = the t10k files, ``[N, 1, 28, 28]`` (or ``images.size``), values / 255."""
    names = ", ".join(IDX_FILES.values())
    where = f"download them from {IDX_SOURCES[dataset]}"
    if config.folder is None:
        raise ImageDataError(
            f"images.dataset={dataset} reads its IDX files ({names}, each optionally .gz) from "
            f"images.folder, which is not set; {where} and set images.folder to their folder"
        )
    folder = Path(config.folder).expanduser()
    paths = {key: _idx_path(folder, name) for key, name in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        state = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise ImageDataError(
            f"images.folder={folder} {state}, but images.dataset={dataset} needs the IDX files "
            f"{names} (each optionally .gz) there; {where}"
        )
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "val"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ImageDataError(
                f"the {split} IDX files in {folder} hold images {images.shape} and labels "
                f"{labels.shape}, not [N, H, W] images with N labels; replace them with the "
                f"dataset's original files ({where})"
            )

    def as_images(array: np.ndarray) -> torch.Tensor:
        return resize(torch.tensor(array, dtype=torch.float32).unsqueeze(1) / 255.0, config.size)

    return ImageData(
        as_images(arrays["train_images"]),
        as_images(arrays["val_images"]),
        torch.tensor(arrays["train_labels"], dtype=torch.long),
        torch.tensor(arrays["val_labels"], dtype=torch.long),
        dataset,
    )


def load_folder_images(config: ImageConfig, seed: int = 0) -> ImageData:
    """Every PNG/JPEG under ``images.folder`` (recursively, sorted), resized to ``images.size``
    square: ``[N, 3, size, size]`` RGB, or ``[N, 1, size, size]`` with ``images.grayscale``."""
    from PIL import Image, UnidentifiedImageError

    if config.folder is None:
        raise ImageDataError(
            "images.dataset=folder reads PNG/JPEG files from images.folder, which is not set; "
            "set images.folder to the folder that holds the images"
        )
    folder = Path(config.folder).expanduser()
    if not folder.is_dir():
        raise ImageDataError(
            f"images.folder={folder} does not exist; set images.folder to a folder of PNG/JPEG "
            "images"
        )
    if config.size is None:
        raise ImageDataError(
            f"images.dataset=folder needs images.size (the side its images are resized to), "
            f"which is not set; set e.g. images.size=32 for the images in {folder}"
        )
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not files:
        raise ImageDataError(
            f"images.folder={folder} holds no .png, .jpg or .jpeg files; put the images there "
            "(subfolders are searched too)"
        )
    mode = "L" if config.grayscale else "RGB"
    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert(mode).resize(
                    (config.size, config.size), Image.Resampling.BICUBIC
                )
                arrays.append(np.asarray(image, dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as error:
            raise ImageDataError(
                f"{path} cannot be read as an image ({error}); remove it or replace it with a "
                "valid PNG/JPEG"
            ) from error
    stacked = np.stack(arrays)  # [N, S, S] or [N, S, S, 3]
    images = torch.tensor(stacked, dtype=torch.float32) / 255.0
    images = images.unsqueeze(1) if config.grayscale else images.permute(0, 3, 1, 2)
    images = images.contiguous()

    relative = [path.relative_to(folder) for path in files]
    labels, classes = None, None
    if all(len(path.parts) > 1 for path in relative):
        classes = tuple(sorted({path.parts[0] for path in relative}))
        index = {name: position for position, name in enumerate(classes)}
        labels = torch.tensor([index[path.parts[0]] for path in relative], dtype=torch.long)
    data = _split(images, labels, config, seed, f"folder:{folder.name}")
    return data._replace(classes=classes)


def load_images(config: ImageConfig, seed: int = 0) -> ImageData:
    """The dataset ``config.dataset`` as :class:`ImageData` (see the module docstring);
    ``seed`` seeds the train/validation split of digits and folders."""
    if config.dataset == "digits":
        return load_digits_images(config, seed)
    if config.dataset in IDX_SOURCES:
        return load_idx_images(config, config.dataset)
    if config.dataset == "folder":
        return load_folder_images(config, seed)
    raise ImageDataError(
        f"images.dataset={config.dataset!r} is unknown; use digits, mnist, fashion-mnist or folder"
    )
