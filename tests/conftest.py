import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/modelcheck.py
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
