"""Exact-match accuracy of final answers, generated greedily in batches through the chat template."""

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from verse.eval.extract import DEFAULT_PATTERN, compile_pattern, extract_answer

Messages = List[Dict[str, str]]


@dataclass
class ExactMatchResult:
    """Outcome of an exact-match evaluation.

    Attributes:
        accuracy (float): correct / total (0 when there are no problems).
        correct (int): problems whose extracted answer equals the reference.
        total (int): problems evaluated.
        unanswered (int): replies where the answer pattern did not match.
        new_tokens (int): tokens generated in all.
        seconds (float): wall time of the generation.
        samples (List[Dict[str, Any]]): per problem: question, reference, prediction, reply, correct.
    """

    accuracy: float
    correct: int
    total: int
    unanswered: int
    new_tokens: int
    seconds: float
    samples: List[Dict[str, Any]] = field(default_factory=list)


def exact_match(model, tokenizer, prompts: Sequence[Messages], references: Sequence[str], *,
                pattern: str = DEFAULT_PATTERN, batch_size: int = 16, max_new_tokens: int = 256,
                generate_fn: Optional[Callable] = None, progress: bool = False) -> ExactMatchResult:
    """Generate a greedy reply to every prompt and compare its extracted final answer with the reference.

    Prompts are rendered with the tokenizer's chat template and generated in batches of similar length
    (sorted by prompt length, so little padding), then restored to their order.

    Args:
        model (ReasoningLLM): the model, in eval mode.
        tokenizer: a Verse tokenizer (chat template, stop ids, decode).
        prompts (Sequence[Messages]): chat messages up to the assistant's turn.
        references (Sequence[str]): the expected answers (compared after `normalize`).
        pattern (str): answer regex (see `extract_answer`).
        batch_size (int): prompts generated together.
        max_new_tokens (int): most tokens per reply.
        generate_fn (Optional[Callable]): `verse.infer.generate.generate` or a stand-in with its signature.
        progress (bool): show a tqdm progress bar.

    Returns:
        ExactMatchResult: accuracy and per-problem samples.
    """
    from tqdm.auto import tqdm

    from verse.eval.extract import normalize
    from verse.infer.chat import chat_prompt

    if generate_fn is None:
        from verse.infer.generate import generate as generate_fn
    regex = compile_pattern(pattern)
    ids = [chat_prompt(tokenizer, messages) for messages in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    replies: List[List[int]] = [[] for _ in ids]
    start = time.perf_counter()
    with tqdm(total=len(ids), desc="eval", unit="problem", disable=not progress, dynamic_ncols=True) as bar:
        for begin in range(0, len(order), batch_size):
            rows = order[begin:begin + batch_size]
            outputs = generate_fn(model, tokenizer, [ids[i] for i in rows], max_new_tokens=max_new_tokens,
                                  temperature=0.0)
            for i, out in zip(rows, outputs, strict=True):
                replies[i] = out
            bar.update(len(rows))
    seconds = time.perf_counter() - start
    samples = []
    for messages, reference, reply_ids in zip(prompts, references, replies, strict=True):
        reply = tokenizer.decode(reply_ids, skip_special=True)
        prediction = extract_answer(reply, regex)
        samples.append({"question": messages[-1]["content"], "reference": normalize(reference),
                        "prediction": prediction, "reply": reply,
                        "correct": prediction is not None and prediction == normalize(reference)})
    correct = sum(s["correct"] for s in samples)
    return ExactMatchResult(accuracy=correct / len(samples) if samples else 0.0, correct=correct, total=len(samples),
                            unanswered=sum(s["prediction"] is None for s in samples),
                            new_tokens=sum(map(len, replies)), seconds=seconds, samples=samples)
