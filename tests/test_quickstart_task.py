"""The quickstart's synthetic task: determinism, disjoint splits, and answers recomputed from the question text."""

import json
import re

from verse.data.formats import to_example
from verse.quickstart import task

PHRASE = re.compile(r"(add|subtract|multiply by) (\d+)")


def solve_from_text(question: str) -> tuple[int, list[int]]:
    """Independent solver: parse the English question and compute the answer and every intermediate value."""
    start = int(re.match(r"Start with (\d+)\.", question).group(1))
    value, values = start, []
    for verb, x in PHRASE.findall(question.lower()):
        value = {"add": value + int(x), "subtract": value - int(x), "multiply by": value * int(x)}[verb]
        values.append(value)
    return value, values


def test_answers_match_an_independent_solver():
    train, heldout = task.make_splits(300, 100, seed=3)
    for problem in train + heldout:
        record = task.to_record(problem)
        question, reply = record["conversations"][0]["value"], record["conversations"][1]["value"]
        answer, values = solve_from_text(question)
        assert len(values) == len(problem.steps) and 2 <= len(values) <= 3
        assert reply.endswith(f"\nAnswer: {answer}")
        assert all(1 <= v <= task.MAX_VALUE for v in values)
        # every trace line is true arithmetic and the lines chain into each other
        lines = re.findall(r"^(\d+) ([-+*]) (\d+) = (\d+)$", reply, re.MULTILINE)
        assert [int(r) for *_, r in lines] == values
        for a, op, b, r in lines:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(r)
        assert reply.startswith("<think>\n") and "\n</think>\n" in reply


def test_splits_are_deterministic_and_disjoint():
    a_train, a_eval = task.make_splits(500, 64, seed=0)
    b_train, b_eval = task.make_splits(500, 64, seed=0)
    c_train, _ = task.make_splits(500, 64, seed=1)
    assert a_train == b_train and a_eval == b_eval
    assert a_train != c_train
    train_questions = {p.question() for p in a_train}
    eval_questions = {p.question() for p in a_eval}
    assert len(train_questions) == 500 and len(eval_questions) == 64
    assert not train_questions & eval_questions


def test_records_use_the_openthoughts_schema(tmp_path):
    train, _ = task.make_splits(5, 1, seed=0)
    path = task.write_jsonl([task.to_record(p) for p in train], tmp_path / "d" / "train.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5
    for row, problem in zip(rows, train):
        assert set(row) == {"system", "conversations"}
        assert [t["from"] for t in row["conversations"]] == ["user", "assistant"]
        messages = to_example(row, "openthoughts")
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[1]["content"] == problem.question()
    prompts = list(task.iter_problems(rows))
    assert prompts[0][0][0] == {"role": "system", "content": task.SYSTEM}
    assert prompts[0][1] == train[0].solution()
