"""Splits carved out of one collection (tune's --validation-from-train, the LM corpus's held-out documents,
distill's held-out inputs) go by content: the copies of a duplicated record all land on one side."""

from __future__ import annotations

import logging
import random
from collections import Counter

from softprompt.data import TaskData, TaskFormat
from softprompt.data.corpus import held_out_split, load_corpus
from softprompt.data.splits import carve
from softprompt.tune import with_validation
from softprompt.tune.space import TuneArgs
from softprompt.workflows.distilling import split_held_out


def test_carve_without_copies_takes_what_a_shuffle_of_positions_took():
    """Splits recorded before (an LM prompt's held-out documents) keep their members when nothing repeats."""
    order = list(range(30))
    random.Random("13:x").shuffle(order)
    a, b, rest = carve([f"doc {i}" for i in range(30)], [3, 3], "13:x")
    assert a == sorted(order[:3]) and b == sorted(order[3:6])
    assert rest == sorted(order[6:])


def test_carve_keeps_copies_together_and_strata_in_proportion():
    keys = [i % 10 for i in range(40)]  # ten records, each four times
    for seed in range(20):
        held, rest = carve(keys, [8], f"{seed}")
        assert len(held) == 8 and not {keys[i] for i in held} & {keys[i] for i in rest}
    parts = carve(["a", "b", "c"] * 2, [1, 1], "x")  # no group of copies fits a part of one: one group each
    assert sorted(map(tuple, parts)) == [(0, 3), (1, 4), (2, 5)]
    labels = ["a"] * 30 + ["b"] * 10
    held, rest = carve(list(range(40)), [8], "1", labels)
    assert Counter(labels[i] for i in held) == {"a": 6, "b": 2}


def _task(records: list[tuple[str, str]], verbalizer=None) -> TaskData:
    fmt = TaskFormat("{text}", "label", verbalizer)
    return TaskData(fmt, {"train": fmt.validate_records([{"text": t, "label": y} for t, y in records], "t")})


def test_tune_validation_from_train_keeps_duplicates_out_of_both_sides():
    # dup.jsonl of the audit: every review twice; a split by position put one copy on each side
    records = [(f"review {i}", "positive" if i % 2 else "negative") for i in range(20)] * 2
    for seed in range(10):
        out = with_validation(_task(records), TuneArgs(validation_from_train=0.25), seed=seed, echo=lambda s: None)
        train = {e.source for e in out.splits["train"]}
        assert not train & {e.source for e in out.splits["validation"]}
        assert len(out.splits["validation"]) == 10


def test_tune_validation_from_train_is_stratified_by_label_for_classification():
    records = [(f"review {i}", "pos") for i in range(32)] + [(f"review {i}", "neg") for i in range(32, 40)]
    task = _task(records, {"pos": "good", "neg": "bad"})
    lines: list[str] = []
    for seed in range(10):
        out = with_validation(task, TuneArgs(validation_from_train=0.25), seed=seed, echo=lines.append)
        assert Counter(e.label for e in out.splits["validation"]) == {"pos": 8, "neg": 2}
    assert "by label" in lines[0]


def test_lm_held_out_documents_keep_repeated_ones_on_one_side(tmp_path, caplog):
    docs = [f"passage {i}" for i in range(20)] + ["Exeunt."] * 10  # a repeated stage direction
    for seed in range(10):
        split = held_out_split(docs, ("validation", "test"), seed)
        seen = [set(split[s]) for s in ("train", "validation", "test")]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
        assert sorted(split["train"] + split["validation"] + split["test"]) == sorted(docs)
    # files given by the user that share documents are said to (as a template task's files are)
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree")
    (tmp_path / "b.txt").write_text("two\n\nfour")
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        load_corpus(train_file=tmp_path / "a.txt", validation_file=tmp_path / "b.txt",
                    test_file=tmp_path / "b.txt")
    assert "1 of the 2 validation examples also appear in the train split (same text)" in caplog.text
    assert "2 of the 2 test examples also appear in the validation split" in caplog.text


def test_distill_held_out_inputs_keep_repeated_ones_on_one_side():
    texts = [f"input {i}" for i in range(10)] * 3
    for seed in range(10):
        train, held = split_held_out(texts, 0.2, seed)
        assert not set(train) & set(held) and len(held) == 6 and len(train) == 24
    assert split_held_out([f"x{i}" for i in range(5)], 0.2, 3) == split_held_out([f"x{i}" for i in range(5)], 0.2, 3)

