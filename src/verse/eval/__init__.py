"""Evaluation: held-out loss / perplexity on assistant tokens and exact-match accuracy of final answers."""

from verse.eval.exact_match import ExactMatchResult, exact_match
from verse.eval.extract import DEFAULT_PATTERN, extract_answer
from verse.eval.loss import LossResult, heldout_loss

__all__ = ["DEFAULT_PATTERN", "ExactMatchResult", "LossResult", "exact_match", "extract_answer", "heldout_loss"]
