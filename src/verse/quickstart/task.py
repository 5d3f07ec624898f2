"""The quickstart's synthetic reasoning task: counting a word in a list, with a worked tally in `<think>`.

A problem lists a few fruits and asks how many times one of them appears ("How many times does the word
"fig" appear in this list? pear, fig, plum, fig, kiwi"). The reference reply walks the list inside
`<think>...</think>`, one item per line compared with the target, with the running count
("fig = fig? yes, 2"), and ends with a fixed final-answer line, `Answer: 2`. SmolLM2-135M-Instruct miscounts and ignores the format; a few minutes of SFT teach it
the procedure, which is what the quickstart measures. Records use the OpenThoughts schema (`system`,
`conversations` [{from, value}]), so the same training config runs on `open-thoughts/OpenThoughts-114k` by
swapping the source. Generation is deterministic for a seed, and the train and held-out splits share no
problem.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

SYSTEM = "Count step by step inside <think></think>, then give the final line as 'Answer: N'."
ANSWER_PATTERN = r"Answer:\s*(-?\d+)"
WORDS = ("apple", "pear", "plum", "fig", "kiwi", "lime", "grape", "peach", "lemon", "mango", "melon", "cherry")


@dataclass(frozen=True)
class Problem:
    """One counting problem.

    Attributes:
        target (str): the word to count.
        items (Tuple[str, ...]): the list, in order.
    """

    target: str
    items: Tuple[str, ...]

    def question(self) -> str:
        """The user's question."""
        return f'How many times does the word "{self.target}" appear in this list? {", ".join(self.items)}'

    def trace(self) -> List[Tuple[str, bool, int]]:
        """The worked steps: each item, whether it is the target, and the count up to and including it."""
        rows, count = [], 0
        for item in self.items:
            count += item == self.target
            rows.append((item, item == self.target, count))
        return rows

    def answer(self) -> int:
        """How many times `target` appears."""
        return self.trace()[-1][2]

    def solution(self) -> str:
        """The reference assistant reply: `<think>` with one line per item, then `Answer: N`.

        Each line compares the item with the target next to it ("fig = plum? no, 1"), so every step needs only
        the line itself and the previous count, the kind of local step a small model learns quickly.
        """
        lines = "\n".join(f"{item} = {self.target}? {'yes' if hit else 'no'}, {count}"
                          for item, hit, count in self.trace())
        return f"<think>\n{lines}\n</think>\nAnswer: {self.answer()}"


def random_problem(rng: random.Random, length: int) -> Problem:
    """Draw one problem: `length` items from 3 to 5 distinct words, one of which is the target.

    Args:
        rng (random.Random): the random stream.
        length (int): number of items in the list.

    Returns:
        Problem: the problem.
    """
    words = rng.sample(WORDS, rng.randint(3, 5))
    return Problem(words[0], tuple(rng.choice(words) for _ in range(length)))


def make_splits(n_train: int, n_eval: int, seed: int = 0, min_items: int = 4,
                max_items: int = 8) -> Tuple[List[Problem], List[Problem]]:
    """Draw distinct problems and split them into train and held-out sets that share none.

    Args:
        n_train (int): training problems.
        n_eval (int): held-out problems.
        seed (int): seed of the generator; the same seed gives the same splits.
        min_items (int): shortest list.
        max_items (int): longest list.

    Returns:
        Tuple[List[Problem], List[Problem]]: (train, held_out).
    """
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < n_train + n_eval:
        problem = random_problem(rng, rng.randint(min_items, max_items))
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
