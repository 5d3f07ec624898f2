"""The quickstart's synthetic reasoning task: chained integer arithmetic with a worked `<think>` trace.

A problem starts from a number and applies a few operations in order ("Start with 14. Add 7, then multiply
by 3, then subtract 9."). The reference reply works each step on its own line inside `<think>...</think>`
and ends with a fixed final-answer line, `Answer: 54`. Records use the OpenThoughts schema (`system`,
`conversations` [{from, value}]), so the same config trains on `open-thoughts/OpenThoughts-114k` by
swapping the source. Generation is deterministic for a seed, and the train and held-out splits share no
problem.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

SYSTEM = "Work out each step inside <think></think>, then give the final line as 'Answer: N'."
ANSWER_PATTERN = r"Answer:\s*(-?\d+)"

MAX_VALUE = 100  # every intermediate result stays in 1..MAX_VALUE
# (verb phrase, symbol) of each operation
OPS = {"add": ("add {}", "+"), "sub": ("subtract {}", "-"), "mul": ("multiply by {}", "*")}


@dataclass(frozen=True)
class Problem:
    """One chained-arithmetic problem.

    Attributes:
        start (int): the starting number.
        steps (Tuple[Tuple[str, int], ...]): operations in order, each ("add" | "sub" | "mul", operand).
    """

    start: int
    steps: Tuple[Tuple[str, int], ...]

    def question(self) -> str:
        """The user's question, e.g. "Start with 14. Add 7, then multiply by 3. What is the result?"."""
        phrases = [OPS[op][0].format(x) for op, x in self.steps]
        chain = ", then ".join(phrases)
        return f"Start with {self.start}. {chain[0].upper()}{chain[1:]}. What is the result?"

    def trace(self) -> List[Tuple[int, str, int, int]]:
        """The worked steps as (left, symbol, operand, result)."""
        rows, value = [], self.start
        for op, x in self.steps:
            result = value + x if op == "add" else value - x if op == "sub" else value * x
            rows.append((value, OPS[op][1], x, result))
            value = result
        return rows

    def answer(self) -> int:
        """The final result."""
        return self.trace()[-1][3]

    def solution(self) -> str:
        """The reference assistant reply: `<think>` with one line per step, then `Answer: N`."""
        lines = "\n".join(f"{a} {sym} {x} = {r}" for a, sym, x, r in self.trace())
        return f"<think>\n{lines}\n</think>\nAnswer: {self.answer()}"


def random_problem(rng: random.Random, n_steps: int) -> Problem:
    """Draw one problem whose intermediate results all stay in 1..MAX_VALUE.

    Args:
        rng (random.Random): the random stream.
        n_steps (int): number of operations.

    Returns:
        Problem: the problem.
    """
    value = rng.randint(2, 20)
    start, steps = value, []
    for _ in range(n_steps):
        choices = ((["add"] if value + 2 <= MAX_VALUE else []) + (["sub"] if value > 1 else [])
                   + (["mul"] if 2 * value <= MAX_VALUE else []))
        op = rng.choice(choices)
        if op == "add":
            x = rng.randint(2, min(30, MAX_VALUE - value))
        elif op == "sub":
            x = rng.randint(1, min(value - 1, 30))
        else:
            x = rng.randint(2, min(5, MAX_VALUE // value))
        value = value + x if op == "add" else value - x if op == "sub" else value * x
        steps.append((op, x))
    return Problem(start, tuple(steps))


def make_splits(n_train: int, n_eval: int, seed: int = 0, min_steps: int = 2,
                max_steps: int = 3) -> Tuple[List[Problem], List[Problem]]:
    """Draw distinct problems and split them into train and held-out sets that share none.

    Args:
        n_train (int): training problems.
        n_eval (int): held-out problems.
        seed (int): seed of the generator; the same seed gives the same splits.
        min_steps (int): fewest operations per problem.
        max_steps (int): most operations per problem.

    Returns:
        Tuple[List[Problem], List[Problem]]: (train, held_out).
    """
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < n_train + n_eval:
        problem = random_problem(rng, rng.randint(min_steps, max_steps))
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems[n_eval:], problems[:n_eval]


def to_record(problem: Problem) -> Dict[str, Any]:
    """The problem as an OpenThoughts-schema record (`system`, `conversations`)."""
    return {"system": SYSTEM, "conversations": [{"from": "user", "value": problem.question()},
                                                {"from": "assistant", "value": problem.solution()}]}


def write_jsonl(records: Sequence[Dict[str, Any]], path: str | Path) -> Path:
    """Write records as JSON lines, creating the parent directory.

    Returns:
        Path: the file written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def iter_problems(records: Sequence[Dict[str, Any]]) -> Iterator[Tuple[List[Dict[str, str]], str]]:
    """Prompt messages and reference reply of OpenThoughts-schema records (system, then the user turn)."""
    for record in records:
        turns = record["conversations"]
        yield ([{"role": "system", "content": record["system"]}, {"role": "user", "content": turns[0]["value"]}],
               turns[1]["value"])
