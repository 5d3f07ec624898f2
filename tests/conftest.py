"""Shared fixtures. Tests run on CPU with small configs; torch threads follow the 2-core machines."""

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture
def tiny_args():
    from verse import ModelArgs

    return ModelArgs.from_preset("tiny", dtype="float32")


def pytest_configure(config):
    import os

    # Tests never reach the Hugging Face Hub: offline mode makes Hub lookups fail at once instead of hanging.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
