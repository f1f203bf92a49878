"""benchmarks/fair_clients.py and benchmarks/tune_vs_train.py: they run, check answers before timing, and build
their data sets as their docstrings say."""

from __future__ import annotations

import importlib
import json
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return lambda name: importlib.import_module(name)


def _fair_argv(monkeypatch, model_dir) -> None:
    monkeypatch.setattr(sys, "argv", ["fair_clients.py", "--model", str(model_dir), "--device", "cpu", "--burst", "12",
                                      "--probes", "2", "--gap-ms", "1", "--repeats", "1", "--max-batch-requests", "4"])


def test_fair_clients_benchmark_runs_on_tiny_model(tiny_model_dir, bench, monkeypatch, capsys):
    fair = bench("fair_clients")
    _fair_argv(monkeypatch, tiny_model_dir)
    assert fair.main() == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("FIFO ", "fair "))]
    assert [r[0] for r in rows] == ["FIFO", "fair"] and all(float(x) > 0 for r in rows for x in r[1:])
    assert "B's median latency: FIFO / fair = " in out and "every answer checked against the engine alone" in out


def test_fair_clients_benchmark_refuses_to_time_answers_off_the_reference(tiny_model_dir, bench, monkeypatch, capsys):
    fair = bench("fair_clients")
    real = fair.serve_once

    def one_wrong(engine, burst, probes, gap, is_fair, mbr):
        a_res, b_res, a_s, b_lat = real(engine, burst, probes, gap, is_fair, mbr)
        r = b_res[0]
        other = next(label for label in r.probs if label != r.label)
        b_res[0] = type(r)(**{**vars(r), "label": other})
        return a_res, b_res, a_s, b_lat

    monkeypatch.setattr(fair, "serve_once", one_wrong)
    _fair_argv(monkeypatch, tiny_model_dir)
    assert fair.main() == 1
    out = capsys.readouterr()
    assert "1 answers differ from the one-at-a-time reference" in out.err and "B median" not in out.out


def test_mcnemar_exact_p(bench):
    tune = bench("tune_vs_train")
    assert tune.mcnemar_p(0, 0) == 1.0 and tune.mcnemar_p(5, 5) == 1.0
    assert tune.mcnemar_p(10, 3) == pytest.approx(2 * 378 / 2 ** 13)  # 2 x P(X <= 3), X ~ Bin(13, 1/2)
    assert tune.mcnemar_p(3, 10) == tune.mcnemar_p(10, 3)
    assert tune.mcnemar_p(0, 12) == pytest.approx(2 / 2 ** 12)


def test_tune_vs_train_pairs_the_prompts_within_each_part_of_validation(bench):
    """The part both runs ranked on and the rest are scored apart: accuracy, macro-F1 and the disagreements of
    the examples in the part only."""
    tune = bench("tune_vs_train")

    def preds(pairs):
        return [SimpleNamespace(expected=e, predicted=p) for e, p in pairs]

    got = {"tune": preds([("a", "a"), ("b", "a"), ("a", "a"), ("b", "b")]),
           "default": preds([("a", "b"), ("b", "b"), ("a", "a"), ("b", "a")])}
    right = {side: [p.expected == p.predicted for p in ps] for side, ps in got.items()}
    ranked = tune.compare_sides(right, got, ["a", "b"], [True, True, False, False])
    assert ranked["n"] == 2 and ranked["tune"]["accuracy"] == ranked["default"]["accuracy"] == 0.5
    assert (ranked["tune_only_right"], ranked["default_only_right"], ranked["mcnemar_p"]) == (1, 1, 1.0)
    rest = tune.compare_sides(right, got, ["a", "b"], [False, False, True, True])
    assert (rest["tune"]["accuracy"], rest["default"]["accuracy"], rest["tune_only_right"]) == (1.0, 0.5, 1)
    assert rest["tune"]["macro_f1"] == 1.0 and rest["default"]["macro_f1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("task, labels", [("debates", {"republican", "democrat", "moderator"}),
                                          ("conventions", {"democrat", "republican"})])
def test_tune_vs_train_tasks_are_disjoint_splits_given_as_files(bench, tmp_path, task, labels):
    tune = bench("tune_vs_train")
    flags = tune.task_flags(task, tmp_path)
    opts = dict(zip(flags[::2], flags[1::2], strict=True))
    splits = {s: [json.loads(line) for line in Path(opts[f"--{s}-file"]).read_text().splitlines()]
              for s in ("train", "validation", "test")}
    texts = {s: {r["text"] for r in recs} for s, recs in splits.items()}
    assert all(len(texts[s]) == len(splits[s]) for s in splits)  # no text twice
    assert not (texts["train"] & texts["validation"] or texts["train"] & texts["test"]
                or texts["validation"] & texts["test"])
    for recs in splits.values():
        assert set(Counter(r["label"] for r in recs)) == labels
        assert all(len(r["text"].split()) <= tune.MAX_WORDS for r in recs)
    n = {s: len(recs) for s, recs in splits.items()}
    assert n["train"] > 2 * (n["validation"] + n["test"]) / 2 and min(n.values()) > 100
    assert "{text}" in opts["--template"] and opts["--target-field"] == "label"
    assert set(opts["--verbalizer"].replace("=", ",").split(",")) == labels
    again = tune.task_flags(task, tmp_path / "again")  # seeded: the same files again
    assert Path(dict(zip(again[::2], again[1::2], strict=True))["--train-file"]).read_text() == \
        Path(opts["--train-file"]).read_text()
