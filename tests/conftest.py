"""Shared fixtures. Tests run on CPU with small configs; torch threads follow the 2-core machines."""

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread: two OpenMP threads on a shared 2-core machine make tiny matmuls far slower.

    Opt in per file with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_byte_checkpoint(tmp_path_factory):
    """A random `tiny` float32 model saved with the byte tokenizer (a checkpoint directory, seed 0)."""
    import verse
    from verse import ModelArgs, ReasoningLLM

    tok = verse.load_tokenizer("byte")
    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", vocab_size=tok.vocab_size))
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path, tokenizer=tok)
    return path


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
