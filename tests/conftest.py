import pytest
import torch


@pytest.fixture
def one_thread():
    """The machines running this suite share 2 cores: one thread avoids oversubscription stalls
    (and makes float sums independent of the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
