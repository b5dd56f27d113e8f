import os
from pathlib import Path

import pytest

# as effft/__init__.py does, for test modules that import albumentations before effft: no asking
# PyPI for a newer release at every import
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the checkout in CI)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One torch thread for the test: batches of a few small images gain nothing from intra-op
    threads, and on a busy machine with few cores their spin-waiting makes them much slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
