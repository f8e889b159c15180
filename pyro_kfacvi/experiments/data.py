"""CIFAR-10 held in memory as tensors, with a minibatch iterator.

The whole dataset is read once from the standard Python-pickle layout
(``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``), validated, moved to the
requested device and normalised with batched tensor ops.  Iterating minibatches is then
plain tensor indexing, with no per-image work and no ``DataLoader`` workers.

The batch files are read directly instead of through ``torchvision.datasets.CIFAR10``
because torchvision's md5 integrity check rejects losslessly rebuilt copies of the
dataset whose placeholder ``filenames`` entries differ from the originals.

Example::

    data = cifar10("/path/to/data", device="cuda")
    g = torch.Generator().manual_seed(0)
    for x, y in data.train.batches(128, generator=g):
        ...
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR10",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATA_ENV_VAR",
    "DataError",
    "Split",
    "cifar10",
    "denormalize",
    "normalize",
]

#: Environment variable consulted when no ``root`` is passed to :func:`cifar10`.
DATA_ENV_VAR = "KFACVI_DATA"

#: Per-channel (R, G, B) mean and std of the CIFAR-10 training images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_FOLDER = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES = ("test_batch",)
_ROWS_PER_FILE = 10_000
_PIXELS = 3 * 32 * 32


class DataError(ValueError):
    """The dataset is missing, incomplete, corrupt or malformed."""


@dataclass(frozen=True)
class Split:
    """One split of an in-memory image-classification dataset.

    Attributes:
        images: ``(N, C, H, W)`` floating-point tensor.
        labels: ``(N,)`` int64 tensor on the same device as ``images``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"{self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def subset(self, n: int, generator: torch.Generator | None = None) -> Split:
        """Return ``n`` examples: the first ``n``, or a random ``n`` (without
        replacement, in random order) drawn with ``generator`` when one is given."""
        if not 0 < n <= len(self):
            raise ValueError(f"subset size must be in 1..{len(self)}, got {n}")
        if generator is None:
            return Split(self.images[:n], self.labels[:n])
        index = _permutation(len(self), generator)[:n].to(self.device)
        return Split(
            self.images.index_select(0, index), self.labels.index_select(0, index)
        )

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels)`` minibatches covering the split once (one epoch).

        With ``shuffle`` the order is a ``torch.randperm`` drawn from ``generator``
        (the global RNG if ``None``), so an epoch is reproducible given the generator's
        state; each call draws a fresh permutation.  Without ``shuffle`` the batches are
        consecutive views into the split's tensors.  ``drop_last`` skips a final batch
        smaller than ``batch_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        if not shuffle:
            for start in range(0, stop, batch_size):
                end = start + batch_size
                yield self.images[start:end], self.labels[start:end]
            return
        order = _permutation(n, generator).to(self.device)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield self.images.index_select(0, index), self.labels.index_select(0, index)


@dataclass(frozen=True)
class CIFAR10:
    """The CIFAR-10 train (50,000 images) and test (10,000 images) splits."""

    train: Split
    test: Split
    classes: tuple[str, ...] = CIFAR10_CLASSES

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def raw_pixels(self) -> CIFAR10:
        """The same images in ``[0, 1]`` (:func:`denormalize` of both splits, new tensors)."""
        return CIFAR10(*(Split(denormalize(split.images), split.labels) for split in (self.train, self.test)),
                       self.classes)

    def holdout(self, n: int) -> CIFAR10:
        """The data for tuning: the first ``len(train) − n`` training images to train on and the
        last ``n`` in place of the test set, which stays untouched."""
        if not 0 < n < len(self.train):
            raise ValueError(f"the validation set must hold 1..{len(self.train) - 1} images, got {n}")
        images, labels = self.train.images, self.train.labels
        return CIFAR10(Split(images[:-n], labels[:-n]), Split(images[-n:], labels[-n:]), self.classes)


def cifar10(
    root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    normalize: bool = True,
    download: bool = False,
) -> CIFAR10:
    """Load CIFAR-10 into memory.

    Args:
        root: folder containing ``cifar-10-batches-py``, or that folder itself.
            Defaults to the ``KFACVI_DATA`` environment variable.
        device: device the tensors are placed on.
        dtype: floating-point dtype of the images.
        normalize: if true, subtract :data:`CIFAR10_MEAN` and divide by
            :data:`CIFAR10_STD` per channel; otherwise images are ``uint8 / 255``
            in ``[0, 1]``.
        download: if the folder is missing, download it with torchvision into
            ``root``.  Never used when the folder exists.

    Returns:
        A :class:`CIFAR10` with images of shape ``(N, 3, 32, 32)`` and int64 labels.

    Raises:
        DataError: the data cannot be found, downloaded, read or validated.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    folder = _locate(root, download)
    device = torch.device(device)
    return CIFAR10(
        train=_load_split(folder, _TRAIN_FILES, device, dtype, normalize),
        test=_load_split(folder, _TEST_FILES, device, dtype, normalize),
    )


def _permutation(n: int, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(n, generator=generator, device=device)


def _locate(root: str | os.PathLike | None, download: bool) -> Path:
    """Resolve ``root`` to the ``cifar-10-batches-py`` folder, downloading if asked."""
    if root is None:
        root = os.environ.get(DATA_ENV_VAR)
        if not root:
            raise DataError(
                "no CIFAR-10 location given: pass root (--data-dir) or set the "
                f"{DATA_ENV_VAR} environment variable to the folder containing {_FOLDER}"
            )
    root = Path(root).expanduser().resolve()  # a relative path stays right if the working directory changes
    if root.name == _FOLDER and root.is_dir():
        return root
    folder = root / _FOLDER
    if folder.is_dir():
        return folder
    if not download:
        raise DataError(
            f"CIFAR-10 not found: searched {folder} (and {root} itself). Point root "
            f"(--data-dir) or the {DATA_ENV_VAR} environment variable at the folder "
            f"containing {_FOLDER}; to fetch it, call pyro_kfacvi.experiments.data.cifar10(root, download=True) once."
        )
    parent = root.parent if root.name == _FOLDER else root
    try:
        import torchvision

        torchvision.datasets.CIFAR10(str(parent), train=True, download=True)
    except Exception as exc:
        raise DataError(f"downloading CIFAR-10 into {parent} failed: {exc}") from exc
    if not folder.is_dir():
        raise DataError(f"download finished but {folder} does not exist")
    return folder


def _load_split(
    folder: Path,
    names: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
    normalize: bool,
) -> Split:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}")
    parts = [_read_batch(folder / name) for name in names]
    pixels = torch.from_numpy(np.concatenate([p for p, _ in parts]))
    labels = torch.from_numpy(np.concatenate([l for _, l in parts]))
    # Convert on the target device: moving uint8 is 4x cheaper than moving floats.
    images = pixels.to(device).view(-1, 3, 32, 32).to(dtype).div_(255)
    if normalize:  # in place: the training set is 600 MB as float32
        mean, std = _moments(images)
        images.sub_(mean).div_(std)
    return Split(images, labels.to(device))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Images in ``[0, 1]``, shape ``(N, 3, H, W)``, as the networks see them:
    ``(x - CIFAR10_MEAN) / CIFAR10_STD`` per channel."""
    mean, std = _moments(images)
    return (images - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: back to ``[0, 1]`` pixel values."""
    mean, std = _moments(images)
    return images * std + mean


def _moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def as_tensor(values):
        return torch.tensor(values, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)

    return as_tensor(CIFAR10_MEAN), as_tensor(CIFAR10_STD)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one pickled batch; return ``(uint8 data, int64 labels)``."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # EOFError, UnpicklingError, ValueError, OSError, ...
        raise DataError(
            f"cannot read CIFAR-10 batch {path} (truncated or corrupt?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = _field(batch, "data", path)
    labels = _field(batch, "labels", path)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.shape != (_ROWS_PER_FILE, _PIXELS)
    ):
        if isinstance(data, np.ndarray):
            got = f"{data.dtype} array of shape {data.shape}"
        else:
            got = type(data).__name__
        raise DataError(
            f"{path}: 'data' must be a uint8 array of shape "
            f"({_ROWS_PER_FILE}, {_PIXELS}), got {got}"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' are not integers: {exc}") from exc
    if labels.shape != (_ROWS_PER_FILE,):
        raise DataError(
            f"{path}: expected {_ROWS_PER_FILE} labels, got shape {labels.shape}"
        )
    bad = (labels < 0) | (labels >= len(CIFAR10_CLASSES))
    if bad.any():
        raise DataError(
            f"{path}: {int(bad.sum())} labels outside 0..{len(CIFAR10_CLASSES) - 1}, "
            f"e.g. {int(labels[bad][0])}"
        )
    return data, labels


def _field(batch: dict, key: str, path: Path):
    """Look up ``key`` as bytes (Python-2 pickles) or str (Python-3 pickles)."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{path}: pickled dict has no {key!r} entry")
