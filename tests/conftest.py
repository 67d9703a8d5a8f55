"""Shared fixtures: a tiny policy, and a results dir per test (never the repo's results/)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def tiny_policy():
    """A randomly initialised digits flow MLP (small), deterministic."""
    from bench.worlds.digits_model import DigitsFlowMLP

    torch.manual_seed(0)
    return DigitsFlowMLP(hidden=32, depth=2).eval()


@pytest.fixture
def meter():
    from bench.core.meter import ComputeMeter

    return ComputeMeter()
