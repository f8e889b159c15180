import os
from pathlib import Path

import pyro
import pytest
import torch

from pyro_kfacvi import KroneckerDelta, KroneckerNormal


@pytest.fixture
def one_thread():
    """The machines running this suite share 2 cores: one thread avoids oversubscription stalls
    (and makes float sums independent of the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Float64 by default, torch and Pyro seeded with 0."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    yield
    torch.set_default_dtype(previous)


def kronecker_guide(model, rho, **kwargs):
    """The guide family that the old ``KroneckerGuide(model, rho=...)`` selected: a point mass
    (plain K-FAC) for ρ = 0, else the Gaussian with that ρ (``None``: ELBO-exact)."""
    if rho == 0:
        return KroneckerDelta(model, **kwargs)
    return KroneckerNormal(model, rho=rho, **kwargs)


@pytest.fixture
def cifar10_root():
    """The folder holding cifar-10-batches-py ($KFACVI_DATA, else ../shared/data/cifar10); skips if absent."""
    env = os.environ.get("KFACVI_DATA")
    root = Path(env).resolve() if env else Path(__file__).resolve().parents[2] / "shared/data/cifar10"
    root = root.parent if root.name == "cifar-10-batches-py" else root
    if not (root / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 not found at {root}")
    return root
