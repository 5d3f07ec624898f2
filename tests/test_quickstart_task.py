"""The quickstart's synthetic task: determinism, disjoint splits, and answers recomputed from the question text."""

import json
import re

from verse.data.formats import to_example
from verse.quickstart import task


def parse(question: str) -> tuple[str, list[str]]:
    """Target word and items of the English question."""
    match = re.fullmatch(r'How many times does the word "(\w+)" appear in this list\? (.+)', question)
    return match.group(1), match.group(2).split(", ")


def solve_from_text(question: str) -> tuple[int, list[str]]:
    """Independent solver: count the word with `list.count`."""
    target, items = parse(question)
    return items.count(target), items


def test_answers_match_an_independent_solver():
    train, heldout = task.make_splits(300, 100, seed=3)
    for problem in train + heldout:
        record = task.to_record(problem)
        question, reply = record["conversations"][0]["value"], record["conversations"][1]["value"]
        answer, items = solve_from_text(question)
        target, _ = parse(question)
        assert 4 <= len(items) <= 8
        assert reply.endswith(f"\nAnswer: {answer}")
        # the tally walks the list in order and each running count is right
        lines = re.findall(r"^([a-z]+) = ([a-z]+)\? (yes|no), (\d+)$", reply, re.MULTILINE)
        assert [item for item, *_ in lines] == items
        assert {t for _, t, _, _ in lines} == {target}
        assert [hit == "yes" for _, _, hit, _ in lines] == [item == target for item in items]
        assert [int(n) for *_, n in lines] == [items[:i + 1].count(target) for i in range(len(items))]
        assert reply.startswith("<think>\n") and "\n</think>\nAnswer: " in reply


def test_answers_are_spread_out():
    train, _ = task.make_splits(1000, 0, seed=0)
    counts = [solve_from_text(p.question())[0] for p in train]
    # no single answer is a free win for a model that always says the same number
    assert max(counts.count(n) for n in set(counts)) < 0.4 * len(counts)
    assert min(counts) == 0 and max(counts) >= 5


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
    for row, problem in zip(rows, train, strict=True):
        assert set(row) == {"system", "conversations"}
        assert [t["from"] for t in row["conversations"]] == ["user", "assistant"]
        messages = to_example(row, "openthoughts")
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[1]["content"] == problem.question()
    prompts = list(task.iter_problems(rows))
    assert prompts[0][0][0] == {"role": "system", "content": task.SYSTEM}
    assert prompts[0][1] == train[0].solution()
