"""Verse: build, train and serve reasoning-focused LLMs in plain PyTorch.

The package face is lazy: `import verse` loads neither torch nor the model until one of them is used, so the
`verse` command starts at once (`verse --help`). `verse.ModelArgs` and `verse.ReasoningLLM` are imported on
first access (PEP 562 module `__getattr__`).
"""

import importlib
from typing import TYPE_CHECKING, Any

from verse.version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time these come from `__getattr__`
    from verse.config import ModelArgs
    from verse.model import ReasoningLLM

# public name -> module that defines it, imported on first access
LAZY = {"ModelArgs": "verse.config", "ReasoningLLM": "verse.model"}


def __getattr__(name: str) -> Any:
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'verse' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(LAZY))


def load(path, device="cpu", dtype=None, **overrides) -> "ReasoningLLM":
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

    model = load_model(path, device=device, dtype=dtype, **overrides)
    if model.args.checkpointing:  # applied from outside: the model itself knows nothing of checkpointing
        from verse.train.parallelize import apply_ac

        apply_ac(model, every=model.args.checkpoint_every)
    return model


def save(model: "ReasoningLLM", path, tokenizer=None, **kwargs: Any) -> None:
    """Write `model` as the checkpoint directory of DESIGN.md (loadable by `verse.load` and transformers).

    Args:
        model (ReasoningLLM): the model to save.
        path: target directory (created; an existing checkpoint there is replaced atomically).
        tokenizer: optional Verse tokenizer saved beside the weights.
        **kwargs: passed on to `verse.interop.hf.save_pretrained` (e.g. `max_shard_bytes`).
    """
    from verse.interop.hf import save_pretrained

    save_pretrained(model, path, tokenizer=tokenizer, **kwargs)


def load_tokenizer(path_or_name):
    """Load a tokenizer: "o200k" (or "Xenova/gpt-4o"), "byte", a directory with tokenizer.json, or a .gguf file."""
    from verse.tokenization import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path_or_name)


__all__ = ["ModelArgs", "ReasoningLLM", "load", "load_tokenizer", "save", "__version__"]
