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


def test_the_macro_f1_difference_is_bootstrapped_paired_per_example(bench, tmp_path):
    """Tune agrees with the default on 190 of 200 examples and is right on the other 10: every resample of the
    same examples for both sides shows it ahead, so the interval is above 0; identical sides give exactly 0."""
    import random

    tune = bench("tune_vs_train")
    rng = random.Random(1)
    expected = ["a" if i % 2 else "b" for i in range(200)]
    wrong = set(rng.sample(range(200), 60))  # the default's errors; tune fixes 10 of them
    fixed = set(sorted(wrong)[:10])

    def preds(errors):
        flip = {"a": "b", "b": "a"}
        return [SimpleNamespace(expected=e, predicted=flip[e] if i in errors else e) for i, e in enumerate(expected)]

    default, tuned = preds(wrong), preds(wrong - fixed)
    ci = tune.bootstrap_f1_diff(default, tuned, ["a", "b"], rounds=500)
    assert ci["diff"] == pytest.approx(0.05, abs=0.005) and 0 < ci["low"] < ci["diff"] < ci["high"] and ci["p"] < 0.01
    same = tune.bootstrap_f1_diff(default, default, ["a", "b"], rounds=100)
    assert (same["diff"], same["low"], same["high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    got = {"tune": tuned, "default": default}
    right = {side: [p.expected == p.predicted for p in ps] for side, ps in got.items()}
    assert tune.compare_sides(right, got, ["a", "b"], [True] * 200)["macro_f1_diff_ci"]["low"] > 0
    # the table: a p no resample reached is written as a bound, not as 0
    part = {"n": 200, "default": {"accuracy": 0.7, "macro_f1": 0.7}, "tune": {"accuracy": 0.75, "macro_f1": 0.75},
            "mcnemar_p": 0.002, "macro_f1_diff_ci": {"diff": 0.05, "low": 0.02, "high": 0.08, "p": 0.0}}
    results = {"tasks": {"t": {"test": part, "tune_plan": {"keep": [2], "rungs": [10]}, "train_s": 1, "tune_s": 2}}}
    assert "| +0.0500 [+0.0200, +0.0800] (< 0.001) |" in tune.write_table(tmp_path, results)


def test_tune_vs_train_checks_tunes_own_comparison_against_its_scores(bench):
    tune = bench("tune_vs_train")

    def part(n, win, untuned):
        return {"n": n, "winner_metrics": {"accuracy": win}, "untuned_metrics": {"accuracy": untuned}}

    scored = {"validation, ranked on": {"n": 300, "tune": {"accuracy": 0.8367}, "default": {"accuracy": 0.8167}},
              "validation, rest": {"n": 992, "tune": {"accuracy": 0.8538}, "default": {"accuracy": 0.8659}}}
    versus = {"selected_on": part(300, 0.8367, 0.8167), "not_read": part(992, 0.8538, 0.8659)}
    both = "validation, ranked on (300): agrees; validation, rest (992): agrees"
    assert tune.versus_agreement(versus, scored) == both
    versus["not_read"] = part(992, 0.8538, 0.8600)
    differs = "validation, rest (992): DIFFERS: 0.8538 vs 0.8538, 0.8600 vs 0.8659"
    assert differs in tune.versus_agreement(versus, scored)
    versus["not_read"] = part(500, 0.85, 0.86)  # a sample of the rest: not comparable, left out
    assert tune.versus_agreement(versus, scored) == "validation, ranked on (300): agrees"
    assert tune.versus_agreement(None, scored) is None and tune.versus_agreement({"skipped": "x"}, scored) is None


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
