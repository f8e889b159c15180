"""Out-of-distribution sets of pyro_kfacvi.experiments.ood: the idx reader, Fashion-MNIST, noise, permuted CIFAR."""
import gzip
import struct

import numpy as np
import pytest
import torch

from pyro_kfacvi.experiments.ood import fashion_mnist, find_fashion_mnist, ood_sets, permuted_pixels, read_idx, uniform_noise


def write_idx(path, array):
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def fake_fashion(tmp_path):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    return tmp_path, images


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trips(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5))
    write_idx(tmp_path / name, array)
    np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((2, 2)))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="do not match"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_becomes_padded_grey_rgb(fake_fashion):
    root, raw = fake_fashion
    images = fashion_mnist(root, num=3)
    assert images.shape == (3, 3, 32, 32)
    for channel in range(3):
        torch.testing.assert_close(images[:, channel, 2:30, 2:30], torch.from_numpy(raw[:3] / 255).float())
    border = images.clone()
    border[..., 2:30, 2:30] = 0
    assert border.abs().max() == 0


def test_fashion_mnist_missing_is_reported(tmp_path):
    assert find_fashion_mnist(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist(tmp_path)


def test_debian_package_files():
    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    images = fashion_mnist()
    assert images.shape == (10_000, 3, 32, 32) and images.min() == 0 and images.max() == 1
    assert 0.25 < images[..., 2:30, 2:30].mean() < 0.35  # Fashion-MNIST's mean pixel is 0.286


def test_uniform_noise_is_seeded():
    a, b = uniform_noise(64, seed=1), uniform_noise(64, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, uniform_noise(64, seed=2))
    assert a.shape == (64, 3, 32, 32) and 0 <= a.min() and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.01


def test_permuted_pixels_shuffle_positions_but_keep_colour_triples():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = permuted_pixels(images, seed=5)
    assert torch.equal(out, permuted_pixels(images, seed=5)) and not torch.equal(out, images)
    triples_in = images.flatten(2).transpose(1, 2)  # (N, 1024, 3)
    triples_out = out.flatten(2).transpose(1, 2)
    # one permutation for every image: find it from image 0 and apply it to all
    order = [triples_in[0].tolist().index(t) for t in triples_out[0].tolist()]
    torch.testing.assert_close(triples_out, triples_in[:, order])


def test_ood_sets(fake_fashion):
    root, _ = fake_fashion
    cifar = torch.rand(8, 3, 32, 32)
    sets = ood_sets(cifar, 4, seed=0, fashion_root=root)
    assert list(sets) == ["fashion_mnist", "uniform_noise", "permuted_cifar10"]
    assert all(images.shape == (4, 3, 32, 32) for images in sets.values())
    assert list(ood_sets(cifar, 4, fashion_root=root / "missing")) == ["uniform_noise", "permuted_cifar10"]
