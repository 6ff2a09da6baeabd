"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # The tests run micro models: a second intra-op thread only adds wake-ups (index_add_ in the MoE dispatch takes
    # milliseconds per call on a busy 2-core machine), so the whole suite runs with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
