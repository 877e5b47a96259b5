import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# Every process a test starts (ranks, launchers, scripts) prints the Python stack of each of
# its threads if it dies of a signal: a crashed rank otherwise leaves only "SIGSEGV" behind.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def spill_dir(tmp_path):
    """A spill directory on the real disk (not tmpfs), so O_DIRECT is exercised."""
    d = tmp_path / "spill"
    yield str(d)
    leftovers = [os.path.join(r, f) for r, _, files in os.walk(d) for f in files]
    assert not leftovers, f"spill files left behind: {leftovers}"
