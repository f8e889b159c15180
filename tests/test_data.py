"""Tests for pyro_kfacvi.experiments.data against the raw CIFAR-10 pickles."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_kfacvi.experiments.data import (
    CIFAR10,
    CIFAR10_CLASSES,
    DATA_ENV_VAR,
    DataError,
    Split,
    cifar10,
)

FOLDER = "cifar-10-batches-py"
BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def _data_root() -> Path:
    env = os.environ.get(DATA_ENV_VAR)
    root = Path(env).resolve() if env else Path(__file__).resolve().parents[2] / "shared/data/cifar10"
    return root.parent if root.name == FOLDER else root


DATA_ROOT = _data_root()
BATCHES = DATA_ROOT / FOLDER
needs_data = pytest.mark.skipif(
    not BATCHES.is_dir(), reason=f"CIFAR-10 not found at {BATCHES}"
)


def _raw(name):
    with open(BATCHES / name, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return batch[b"data"], np.asarray(batch[b"labels"], dtype=np.int64)


@pytest.fixture(scope="module")
def normalized():
    return cifar10(DATA_ROOT)


@pytest.fixture(scope="module")
def unnormalized():
    # Also exercises the two other ways of locating the data: the environment
    # variable, pointing at cifar-10-batches-py itself.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DATA_ENV_VAR, str(BATCHES))
        return cifar10(normalize=False)


def _fake_tree(tmp_path, replace):
    """A copy of the data folder in ``tmp_path``: symlinks to the real files except
    ``replace[name]`` (bytes) written in their place."""
    folder = tmp_path / FOLDER
    folder.mkdir()
    for name in BATCH_FILES:
        if name in replace:
            (folder / name).write_bytes(replace[name])
        else:
            (folder / name).symlink_to(BATCHES / name)
    return folder


# --------------------------------------------------------------------------- real data


@needs_data
def test_shapes_and_dtypes(normalized):
    assert len(normalized.train) == 50_000 and len(normalized.test) == 10_000
    assert normalized.classes == CIFAR10_CLASSES and normalized.num_classes == 10
    for split in (normalized.train, normalized.test):
        assert split.images.shape == (len(split), 3, 32, 32)
        assert split.images.dtype == torch.float32
        assert split.labels.shape == (len(split),)
        assert split.labels.dtype == torch.int64


@needs_data
@pytest.mark.parametrize("split,name,offset", [("train", "data_batch_1", 0),
                                               ("train", "data_batch_5", 40_000),
                                               ("test", "test_batch", 0)])
def test_pixels_labels_and_order_match_raw(unnormalized, split, name, offset):
    data, labels = _raw(name)
    s = getattr(unnormalized, split)
    images = s.images[offset : offset + 10_000]
    expected = torch.from_numpy(data).view(-1, 3, 32, 32).float() / 255
    assert torch.equal(images, expected)
    assert torch.equal((images * 255).round().to(torch.uint8).flatten(1),
                       torch.from_numpy(data))
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(s.labels[offset : offset + 10_000], torch.from_numpy(labels))


@needs_data
def test_class_balance(normalized):
    assert normalized.train.labels.bincount(minlength=10).tolist() == [5000] * 10
    assert normalized.test.labels.bincount(minlength=10).tolist() == [1000] * 10


@needs_data
def test_normalized_train_statistics(normalized, unnormalized):
    x = normalized.train.images
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    # The published test-set means, as a check on the raw [0, 1] test pixels.
    test_mean = unnormalized.test.images.mean(dim=(0, 2, 3))
    assert torch.allclose(test_mean, torch.tensor([0.49421, 0.48513, 0.45041]), atol=1e-4)


# --------------------------------------------------------------------------- batching


def _toy(n=103):
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    return Split(images.contiguous(), torch.arange(n))


def test_batches_cover_each_index_once():
    split = _toy()
    batches = list(split.batches(10, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(len(split)))
    assert not torch.equal(seen, torch.arange(len(split)))  # actually shuffled
    for x, y in batches:  # images travel with their labels
        assert torch.equal(x[:, 0, 0, 0].long(), y)


def test_batches_reproducible_for_same_seed():
    split = _toy()

    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in split.batches(16, generator=g)])

    assert torch.equal(epoch(1), epoch(1))
    assert not torch.equal(epoch(1), epoch(2))
    g = torch.Generator().manual_seed(1)  # successive epochs draw new permutations
    first = torch.cat([y for _, y in split.batches(16, generator=g)])
    second = torch.cat([y for _, y in split.batches(16, generator=g)])
    assert not torch.equal(first, second)


def test_batches_unshuffled_and_drop_last():
    split = _toy()
    batches = list(split.batches(10, shuffle=False, drop_last=True))
    assert len(batches) == 10
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(100))
    with pytest.raises(ValueError):
        next(split.batches(0))


def test_subset():
    split = _toy()
    first = split.subset(7)
    assert len(first) == 7 and torch.equal(first.labels, torch.arange(7))
    rand = split.subset(20, generator=torch.Generator().manual_seed(0))
    assert len(rand) == 20 and len(set(rand.labels.tolist())) == 20
    assert torch.equal(rand.images[:, 0, 0, 0].long(), rand.labels)
    for bad in (0, len(split) + 1):
        with pytest.raises(ValueError):
            split.subset(bad)


def test_holdout_trains_on_the_rest_and_leaves_the_test_set_alone():
    data = CIFAR10(_toy(), Split(torch.zeros(5, 3, 32, 32), torch.zeros(5, dtype=torch.long)))
    tuning = data.holdout(8)
    assert torch.equal(tuning.train.labels, data.train.labels[:-8])
    assert torch.equal(tuning.test.labels, data.train.labels[-8:])
    assert torch.equal(tuning.test.images, data.train.images[-8:])
    for bad in (0, len(data.train)):
        with pytest.raises(ValueError, match="validation set"):
            data.holdout(bad)


# --------------------------------------------------------------------------- errors


def test_missing_folder_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        cifar10(missing)
    msg = str(err.value)
    assert str(missing / FOLDER) in msg
    assert DATA_ENV_VAR in msg and "--data-dir" in msg and "download=True" in msg and "--download" not in msg


def test_no_root_and_no_env(monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    with pytest.raises(DataError, match=DATA_ENV_VAR):
        cifar10()


def test_download_failure_is_reported(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="network unreachable"):
        cifar10(tmp_path, download=True)


def test_missing_batch_file(tmp_path):
    folder = tmp_path / FOLDER
    folder.mkdir()
    with pytest.raises(DataError, match="data_batch_1"):
        cifar10(tmp_path)


def test_non_float_dtype_rejected(tmp_path):
    with pytest.raises(ValueError, match="floating"):
        cifar10(tmp_path, dtype=torch.uint8)


@needs_data
def test_truncated_pickle_names_file(tmp_path):
    raw = (BATCHES / "data_batch_1").read_bytes()
    folder = _fake_tree(tmp_path, {"data_batch_1": raw[: len(raw) // 2]})
    with pytest.raises(DataError) as err:
        cifar10(folder)
    assert str(folder / "data_batch_1") in str(err.value)


def _pickled(data, labels):
    return pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"})


@needs_data
def test_out_of_range_labels(tmp_path):
    labels = [0] * 9_999 + [10]
    blob = _pickled(np.zeros((10_000, 3072), np.uint8), labels)
    folder = _fake_tree(tmp_path, {"data_batch_1": blob})
    with pytest.raises(DataError, match=r"data_batch_1.*outside 0\.\.9"):
        cifar10(folder)


@needs_data
@pytest.mark.parametrize(
    "data,labels",
    [
        (np.zeros((9_999, 3072), np.uint8), [0] * 9_999),  # wrong count
        (np.zeros((10_000, 3072), np.float32), [0] * 10_000),  # wrong dtype
        (np.zeros((10_000, 1024), np.uint8), [0] * 10_000),  # wrong width
        (np.zeros((10_000, 3072), np.uint8), [0] * 9_999),  # too few labels
    ],
)
def test_malformed_batch(tmp_path, data, labels):
    folder = _fake_tree(tmp_path, {"data_batch_1": _pickled(data, labels)})
    with pytest.raises(DataError, match="data_batch_1"):
        cifar10(folder)
