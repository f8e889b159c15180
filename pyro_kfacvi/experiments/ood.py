"""Out-of-distribution inputs for CIFAR-10 classifiers, available without downloads.

Every set is returned as **raw** images: RGB in ``[0, 1]``, shape ``(N, 3, 32, 32)`` (normalise with
:func:`pyro_kfacvi.data.normalize` before the network sees them), so that the OOD inputs go
through exactly the preprocessing of the in-distribution test images.

* :func:`fashion_mnist`: Zalando's Fashion-MNIST test images (28×28 grey), zero-padded to
  32×32 and repeated over the three channels. Read from the idx files of the Debian package
  ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``), or any folder holding ``t10k-images-idx3-ubyte[.gz]``;
* :func:`uniform_noise`: every pixel and channel i.i.d. U(0, 1);
* :func:`permuted_pixels`: CIFAR-10 test images with their 32·32 pixel positions shuffled by one
  fixed random permutation (colour triples kept): the same colour statistics, no spatial
  structure.
"""
import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FASHION_MNIST_DIRS", "FASHION_MNIST_ENV", "fashion_mnist", "find_fashion_mnist", "ood_sets",
           "permuted_pixels", "read_idx", "uniform_noise"]

#: environment variable naming a folder with Fashion-MNIST's idx files.
FASHION_MNIST_ENV = "KFACVI_FASHION_MNIST"
#: folders searched after the environment variable (the Debian package's).
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """An array from an idx file (LeCun's MNIST format; gzip-compressed if named ``*.gz``): two zero
    bytes, a type byte, the number of dimensions, then each dimension as a big-endian int32."""
    path = Path(path)
    data = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an idx file")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    count = int(np.prod(shape))
    if len(data) != 4 + 4 * ndim + count * dtype.itemsize:
        raise ValueError(f"{path}: {len(data)} bytes do not match the header's shape {shape}")
    return np.frombuffer(data, dtype, count=count, offset=4 + 4 * ndim).reshape(shape)


def find_fashion_mnist(root=None, split="t10k"):
    """Path of ``{split}-images-idx3-ubyte[.gz]`` in ``root``, else in ``$KFACVI_FASHION_MNIST``, else in
    :data:`FASHION_MNIST_DIRS`; ``None`` if there is none."""
    env = os.environ.get(FASHION_MNIST_ENV)
    folders = [Path(root)] if root is not None else [Path(env)] if env else list(FASHION_MNIST_DIRS)
    for folder in folders:
        for name in (f"{split}-images-idx3-ubyte.gz", f"{split}-images-idx3-ubyte"):
            if (folder / name).is_file():
                return folder / name
    return None


def fashion_mnist(root=None, split="t10k", num=None):
    """Fashion-MNIST images as raw CIFAR-shaped inputs ``(N, 3, 32, 32)`` in ``[0, 1]``: each 28×28
    grey image padded with 2 black pixels per side and repeated over R, G and B. The first ``num``
    images (all if ``None``). Raises ``FileNotFoundError`` if the files are missing."""
    path = find_fashion_mnist(root, split)
    if path is None:
        raise FileNotFoundError(f"Fashion-MNIST {split} images not found (apt-get install dataset-fashion-mnist, "
                                f"or set {FASHION_MNIST_ENV})")
    pixels = torch.from_numpy(read_idx(path)[:num].copy())
    images = F.pad(pixels.float().div_(255), (2, 2, 2, 2))
    return images.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def uniform_noise(num, seed=0, shape=(3, 32, 32)):
    """``num`` images with i.i.d. U(0, 1) pixels, from a generator seeded with ``seed``."""
    return torch.rand(num, *shape, generator=torch.Generator().manual_seed(seed))


def permuted_pixels(images, seed=0):
    """``images (N, C, H, W)`` with the H·W pixel positions shuffled by one permutation drawn from a
    generator seeded with ``seed``; the same permutation for every image and channel."""
    n, c, h, w = images.shape
    order = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed)).to(images.device)
    return images.reshape(n, c, h * w)[..., order].reshape(n, c, h, w)


def ood_sets(cifar_test, num, seed=0, fashion_root=None):
    """``{name: raw images}``: Fashion-MNIST (if its files are found), uniform noise and permuted-pixel
    CIFAR-10 (from ``cifar_test``, raw test images), ``num`` images each, on ``cifar_test``'s device."""
    sets = {}
    if find_fashion_mnist(fashion_root) is not None:
        sets["fashion_mnist"] = fashion_mnist(fashion_root, num=num)
    sets["uniform_noise"] = uniform_noise(num, seed)
    sets["permuted_cifar10"] = permuted_pixels(cifar_test[:num], seed)
    return {name: images.to(cifar_test.device) for name, images in sets.items()}
