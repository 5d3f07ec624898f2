"""Shared fixtures. Tests run on CPU with small configs; torch threads follow the 2-core machines."""

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture
def tiny_args():
    from verse import ModelArgs

    return ModelArgs.from_preset("tiny", dtype="float32")
