import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The models here are tiny: on shared, busy cores a second intra-op thread only adds synchronisation
    # (a 12-token generate takes ~8 s with 2 threads under load, ~0.1 s with 1).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
