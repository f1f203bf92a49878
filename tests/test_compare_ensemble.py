"""``softprompt compare --store``: each prompt method's seed prompts and their ensemble go into the store and the
row gets the ensemble's test accuracy and its gain over the mean single prompt; weight methods store nothing.

A large random init (8 virtual tokens, scale 4) and a tiny lr keep the seeds' prompts apart on the tiny model,
so its members disagree on the toy test split and the gain is not zero by construction.
"""

from __future__ import annotations

import copy
import json
import statistics

import pytest

from softprompt.cli import main
from softprompt.compare import CompareSettings, Spec, run_compare, run_one
from softprompt.compare.ensemble import EnsembleEval, evaluate_ensemble, evaluate_in_subprocess, method_slug
from softprompt.data import TaskData, TaskFormat
from softprompt.engine import Engine
from softprompt.evaluate import evaluate_on_engine
from softprompt.model import load_base_model
from softprompt.store import PromptStore
from tests.test_compare import toy, toy_task  # noqa: F401  (toy: a fixture)

PT = Spec("prompt tuning, random init, P=8", "prompt_tuning", {"num_virtual_tokens": 8, "init": "random",
                                                               "init_scale": 4.0}, "adamw", 1e-3)
SLUG = "prompt-tuning-random-init-p-8"



def settings(model_dir, seeds: int = 4, test_samples: int = 16) -> CompareSettings:
    return CompareSettings(str(model_dir), "x", steps=2, batch_size=8, test_samples=test_samples, val_samples=16,
                           seeds=seeds, lr_search=False)


@pytest.fixture
def capped_toy(monkeypatch) -> TaskData:
    """:func:`toy_task` loaded as ``load_task`` does: each split cut to its ``max_samples`` cap."""
    data = toy_task()

    def load(*args, max_samples=None, **kwargs):
        task = copy.deepcopy(data)
        for split, n in (max_samples or {}).items():
            task.splits[split] = task.splits[split][:n]
        return task

    monkeypatch.setattr("softprompt.data.load_task", load)
    return data


def test_compare_store_adds_seed_prompts_and_ensemble_per_prompt_method_and_none_for_weights(
        tiny_model_dir, capped_toy, tmp_path, engine_sources):
    out, store_dir = tmp_path / "cmp", tmp_path / "store"
    rows = run_compare([PT, Spec("BitFit", "bitfit", {}, "adamw", 1e-3)], settings(tiny_model_dir, test_samples=12),
                       out, log=lambda s: None, runner=run_one, store=str(store_dir), evaluate=evaluate_ensemble)
    assert method_slug(PT.label) == SLUG
    members = [f"{SLUG}-seed{s}" for s in range(4)]
    store = PromptStore(store_dir)
    assert store.names() == sorted([SLUG, *members])  # nothing for BitFit
    assert store.kind(SLUG) == "ensemble" and store.ensemble(SLUG).members == members
    assert store.ensemble(SLUG).combine == "mean"
    recorded = [store.load(m).meta["train_config"]["compare"] for m in members]
    assert [r["seed"] for r in recorded] == [0, 1, 2, 3]
    # how each was trained: the schedule and the steps it ran (a run may stop at its plateau)
    assert [(r["schedule"], r["steps_run"]) for r in recorded] == [("wsd", s["steps_run"]) for s in rows[0]["seeds"]]
    assert all((out / "prompts" / SLUG / f"seed{s}" / "adapter_model.safetensors").is_file() for s in range(4))

    pt, bitfit = rows
    assert "ensemble" not in bitfit and "ensemble_accuracy" not in bitfit
    assert all("prompt_dir" not in r for r in bitfit["seeds"])
    ens = pt["ensemble"]
    # the members were scored on the seed runs' own test examples: the same accuracies, through the engine
    assert ens["member_accuracy"] == [r["accuracy"] for r in pt["seeds"]] and "note" not in ens
    assert len(set(ens["member_accuracy"])) > 1  # they disagree
    test = capped_toy.examples("test")[:12]  # the seed runs' --test-samples 12
    assert engine_sources == [[ex.source for ex in test]] and ens["n"] == 12 and ens["split"] == "test"

    # an independent evaluation of the stored entries
    model, tok = load_base_model(str(tiny_model_dir))
    own = evaluate_on_engine(Engine.from_store(store, model, tok), {n: n for n in store.names()}, test,
                             capped_toy.format)
    singles = [own[m]["accuracy"] for m in members]
    gain = own[SLUG]["accuracy"] - statistics.fmean(singles)
    assert ens["member_accuracy"] == singles and pt["ensemble_accuracy"] == own[SLUG]["accuracy"]
    assert gain != 0 and pt["ensemble_gain"] == pytest.approx(gain, abs=1e-12)
    assert pt["ensemble_gain"] == pytest.approx(pt["ensemble_accuracy"] - pt["accuracy"], abs=1e-12)

    saved = json.loads((out / "compare.json").read_text())["rows"]
    assert saved[0]["ensemble_accuracy"] == pt["ensemble_accuracy"] and "ensemble" not in saved[1]
    md = (out / "compare.md").read_text().splitlines()
    assert md[0].endswith("| ensemble accuracy | gain over mean single prompt |")
    assert md[2].endswith(f"| {pt['ensemble_accuracy']:.4f} | {gain:+.4f} |")
    assert md[3].endswith("| - (no prompt) | - |")


GEN = TaskFormat("Country: {country}\nCapital:", "capital")


def test_compare_store_on_a_generation_task_stores_the_seed_prompts_and_says_why_no_ensemble(
        tiny_model_dir, tmp_path, monkeypatch):
    pairs = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome")]
    recs = [GEN.render({"country": c, "capital": k}) for c, k in pairs * 4]
    data = TaskData(GEN, {"train": recs[:8], "test": recs[8:], "validation": recs[:4]})
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: copy.deepcopy(data))
    lines, store_dir = [], tmp_path / "store"
    pt = Spec("pt", "prompt_tuning", {"num_virtual_tokens": 2, "init": "random"}, "adamw", 1e-3)
    row, = run_compare([pt], settings(tiny_model_dir, seeds=2), tmp_path / "cmp", log=lines.append, runner=run_one,
                       store=str(store_dir), evaluate=lambda ev: pytest.fail("a generation task was evaluated"))
    assert sorted(PromptStore(store_dir).names()) == ["pt-seed0", "pt-seed1"]
    assert row["ensemble"]["skipped"].startswith("a generation task") and "ensemble_accuracy" not in row
    assert any("pt: seed prompts stored as pt-seed0, pt-seed1; no ensemble: a generation task" in ln for ln in lines)
    assert "| n/a (generation task) | - |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_command_with_store(tiny_model_dir, toy, tmp_path, capsys, monkeypatch):  # noqa: F811
    """The command: --store is checked before any training; the runs and the ensemble evaluation in this process."""
    import softprompt.compare.ensemble
    import softprompt.compare.harness

    monkeypatch.setattr(softprompt.compare.harness, "run_in_subprocess", run_one)
    monkeypatch.setattr(softprompt.compare.ensemble, "evaluate_in_subprocess", evaluate_ensemble)
    out, store_dir = tmp_path / "cmp", tmp_path / "store"
    argv = ["compare", "--model", str(tiny_model_dir), "--dataset", "rotten_tomatoes", "--steps", "1",  # toy data
            "--batch-size", "8", "--test-samples", "16", "--val-samples", "16", "--no-lr-search", "--only",
            "p_tuning,bitfit", "--output-dir", str(out), "--store", str(store_dir)]
    assert main(argv + ["--seeds", "1"]) == 2
    assert "an ensemble needs --seeds >= 2, got 1" in capsys.readouterr().err
    first = main(argv + ["--seeds", "2"])
    assert first == 0 and sorted(PromptStore(store_dir).names()) == ["p-tuning-mlp-p-20", "p-tuning-mlp-p-20-seed0",
                                                                     "p-tuning-mlp-p-20-seed1"]
    text = capsys.readouterr().out
    assert "seed prompts and their mean ensemble go into store" in text and "| ensemble accuracy |" in text
    store = PromptStore(store_dir)
    store.remove("p-tuning-mlp-p-20")
    store.add("p-tuning-mlp-p-20", store.path("p-tuning-mlp-p-20-seed0"))
    assert main(argv + ["--seeds", "2"]) == 2  # refused before training: a prompt where the ensemble goes
    assert "'p-tuning-mlp-p-20' is a prompt, compare writes an ensemble there" in capsys.readouterr().err
    (tmp_path / "not_a_store").mkdir()
    (tmp_path / "not_a_store" / "x.txt").write_text("x")
    assert main(argv[:-1] + [str(tmp_path / "not_a_store"), "--seeds", "2"]) == 2
    assert "not a prompt store" in capsys.readouterr().err


def test_the_ensemble_evaluation_runs_in_a_child_process(tiny_model_dir, tmp_path):
    """The child entry point dispatches an ensemble evaluation (here one whose store does not exist)."""
    scored = evaluate_in_subprocess(EnsembleEval(str(tiny_model_dir), "capitals", 4, 4, str(tmp_path / "nope"), "x"))
    assert "not a prompt store" in scored["error"]


def test_the_ensemble_is_scored_in_float32_as_every_compare_row_is(monkeypatch, tmp_path):
    """The seed runs load the model in fp32 on any device; the ensemble's evaluation took the default dtype (bf16
    on CUDA), so its members' accuracies were not the seed runs' own and the gain mixed two precisions."""
    import inspect

    import softprompt.model

    real, seen = softprompt.model.load_base_model, []

    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        seen.append(bound.arguments["dtype"])
        raise Loaded

    monkeypatch.setattr(softprompt.model, "load_base_model", load)
    with pytest.raises(Loaded):
        evaluate_ensemble(EnsembleEval("tiny", "capitals", 4, 4, str(tmp_path / "store"), "x"))
    assert seen == ["float32"]
