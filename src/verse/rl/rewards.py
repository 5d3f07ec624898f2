"""Reward functions `(prompt, completion, reference) -> float`: built-ins, user functions by `module:function`,
and scoring that never lets a failing function stop a run."""

import importlib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from verse.errors import VerseError
from verse.eval.extract import extract_answer, normalize

RewardFn = Callable[[str, str, str], float]

# the last `Answer: X` (to the end of its line) or `\boxed{X}`, one group, for `verse.eval.extract.extract_answer`
ANSWER_PATTERN = r"(?:Answer:[ \t]*|\\boxed\{)([^\n}]*[^\s}])"
THINK_PATTERN = re.compile(r"^\s*(?:<think>)?(.*?)</think>(.*)$", re.S)


def final_answer(text: str) -> Optional[str]:
    """The last `Answer: …` or `\\boxed{…}` in `text`, normalised (`verse.eval.extract.normalize`); None if none."""
    return extract_answer(text, ANSWER_PATTERN)


def same_answer(prediction: Optional[str], reference: str) -> bool:
    """Whether two answers agree: as numbers when both read as numbers (`1.50` == `1.5`), else as normalised text."""
    if prediction is None:
        return False
    reference = final_answer(reference) or normalize(reference)
    try:
        return math.isclose(float(prediction), float(reference), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return prediction == reference


def exact_answer(prompt: str, completion: str, reference: str) -> float:
    """1 when the completion's final answer (last `Answer: …` or `\\boxed{…}`) equals the reference, else 0."""
    return float(same_answer(final_answer(completion), reference))


def format_reward(prompt: str, completion: str, reference: str) -> float:
    """1 when the completion reasons in `<think>…</think>` and then gives an answer, else 0.

    The opening `<think>` may be missing when the chat template's generation prompt already opened it."""
    match = THINK_PATTERN.match(completion)
    return float(match is not None and "<think>" not in match.group(2) and final_answer(match.group(2)) is not None)


def length_penalty(prompt: str, completion: str, reference: str, max_chars: int = 1000) -> float:
    """-len(completion) / max_chars, at most -1: shorter completions score higher."""
    return -min(1.0, len(completion) / max_chars)


BUILTIN: Dict[str, RewardFn] = {"exact_answer": exact_answer, "format": format_reward, "length": length_penalty}


@dataclass
class Reward:
    """One weighted reward function of the `grpo.rewards` list.

    Attributes:
        name (str): a built-in (exact_answer, format, length) or `module:function`.
        weight (float): its weight in the total reward.
        args (Dict[str, Any]): extra keyword arguments (e.g. `max_chars` of `length`).
    """

    name: str
    weight: float = 1.0
    args: Dict[str, Any] = field(default_factory=dict)

    def function(self) -> RewardFn:
        """The callable, importing a `module:function` (raising `VerseError` when it cannot be found)."""
        if self.name in BUILTIN:
            fn = BUILTIN[self.name]
        elif ":" in self.name:
            module, _, attr = self.name.partition(":")
            cwd = os.getcwd()
            added = cwd not in sys.path and "" not in sys.path  # the `verse` script does not put it there
            if added:
                sys.path.insert(0, cwd)
            try:
                fn = getattr(importlib.import_module(module), attr)
            except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, or the module's own failure
                raise VerseError(f"grpo.rewards: cannot load reward function {self.name!r} ({type(e).__name__}: "
                                 f"{e}); give module:function importable from the current directory") from None
            finally:
                if added:
                    sys.path.remove(cwd)
            if not callable(fn):
                raise VerseError(f"grpo.rewards: {self.name!r} is not a function")
        else:
            raise VerseError(f"grpo.rewards: unknown reward {self.name!r}: use one of {', '.join(BUILTIN)} or "
                             "module:function")
        if self.args:
            return lambda p, c, r, _fn=fn: _fn(p, c, r, **self.args)
        return fn


@dataclass
class Scores:
    """Rewards of a batch of completions.

    Attributes:
        total (List[float]): the weighted sum per completion.
        per_function (Dict[str, float]): each function's mean (unweighted) over the batch.
        errors (Dict[str, int]): completions each function failed on (raised, or returned a non-number), scored 0.
    """

    total: List[float]
    per_function: Dict[str, float]
    errors: Dict[str, int]


def score(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str],
          references: Sequence[str]) -> Scores:
    """Score every completion with every reward function; a function that raises (or returns NaN or a non-number)
    scores 0 for that completion and is counted, never stopping the run.

    Args:
        rewards (Sequence[Reward]): the weighted functions.
        prompts (Sequence[str]): prompt text of each completion.
        completions (Sequence[str]): the completions.
        references (Sequence[str]): reference answer of each completion.

    Returns:
        Scores: totals, per-function means and error counts.
    """
    total = [0.0] * len(completions)
    per_function, errors = {}, {}
    for reward in rewards:
        fn = reward.function()
        values, failed = [], 0
        for p, c, r in zip(prompts, completions, references, strict=True):
            try:
                value = float(fn(p, c, r))
                if not math.isfinite(value):
                    raise ValueError("not finite")
            except Exception:  # noqa: BLE001 - a user's reward function may fail in any way
                value, failed = 0.0, failed + 1
            values.append(value)
        for i, value in enumerate(values):
            total[i] += reward.weight * value
        per_function[reward.name] = sum(values) / len(values) if values else 0.0
        errors[reward.name] = failed
    return Scores(total=total, per_function=per_function, errors=errors)
