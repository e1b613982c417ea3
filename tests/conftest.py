import os

import pytest
import torch

# Tests use tiny tensors, and on a busy 2-core machine several threads per process make OpenMP
# spin-wait (10x slower): one thread here and in the subprocesses the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
