"""The `ReasoningLLM` model and its layers."""

from verse.model.transformer import ReasoningLLM

__all__ = ["ReasoningLLM"]
