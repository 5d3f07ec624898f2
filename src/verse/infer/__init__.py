"""Inference: KV-cache generation with sampling and stop conditions, chat prompts, terminal and web chat."""

from verse.infer.generate import generate, stream
from verse.infer.sampling import SamplingParams

__all__ = ["SamplingParams", "generate", "stream"]
