"""Block tests use tiny tensors: extra intra-op threads only add contention on the 2-core CI machine."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
