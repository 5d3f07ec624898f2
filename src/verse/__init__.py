"""Verse: build, train and serve reasoning-focused LLMs in plain PyTorch."""

from verse.config import ModelArgs
from verse.model import ReasoningLLM

__version__ = "0.1.0"


def load(path, device="cpu", dtype=None, **overrides) -> ReasoningLLM:
    """Load a model from a Verse checkpoint directory, a Hugging Face model directory or a `.gguf` file.

    Args:
        path: checkpoint directory or .gguf file.
        device: where to put the weights.
        dtype (Optional[torch.dtype]): parameter dtype; None keeps the checkpoint's own.
        **overrides: `ModelArgs` fields that change execution, not weights (e.g. `checkpointing=True`).

    Returns:
        ReasoningLLM: the model, in eval mode.
    """
    from verse.interop.load import load_model

    return load_model(path, device=device, dtype=dtype, **overrides)


def load_tokenizer(path_or_name):
    """Load a tokenizer: "o200k" (or "Xenova/gpt-4o"), "byte", a directory with tokenizer.json, or a .gguf file."""
    from verse.tokenization import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path_or_name)


__all__ = ["ModelArgs", "ReasoningLLM", "load", "load_tokenizer", "__version__"]
