import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. It must be chosen
# before any kernel module is imported (kernels are decorated at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny matrices: one thread beats two on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
