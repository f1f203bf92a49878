"""``softprompt tune --ensemble-seeds N`` and the ``--top-k`` ensemble: members, store entries, validation gain.

The tiny random model stays near chance, so the searches rank by validation loss (as in ``test_tune``); a
large random init (scale 2) and seed 0 make the members' predictions differ, so the gain is not zero and
its arithmetic is checked for real.
"""

from __future__ import annotations

import argparse
import json
import statistics

import pytest
import torch

from softprompt.config import ConfigError, DataArgs, EvalArgs, ModelArgs, PromptArgs
from softprompt.data import TaskData, TaskFormat
from softprompt.engine import Engine
from softprompt.evaluate import evaluate_on_engine
from softprompt.store import PromptStore
from softprompt.tune import TuneArgs, add_tune_arguments, run_tune, tune_args_from_namespace
from tests.conftest import make_model
from tests.test_train import task
from tests.test_tune import base, prompt_tensor

PROMPT = PromptArgs(num_virtual_tokens=4, init="random", init_scale=2.0)


class Untouchable(list):
    """A split that fails the test on any read (the test split, which tune must never look at)."""

    def _read(self, *args, **kwargs):
        raise AssertionError("the test split was read")

    __iter__ = __len__ = __getitem__ = __bool__ = __contains__ = __reversed__ = _read


def with_test_split(data: TaskData) -> TaskData:
    return TaskData(data.format, {**data.splits, "test": Untouchable(data.examples("validation"))})


def sections(out, **train_kw) -> dict:
    return {"model": ModelArgs(), "data": DataArgs(max_length=64), "prompt": PROMPT,
            "train": base(out, **{"max_steps": 8, "seed": 0, "warmup_steps": 2, **train_kw}),
            "eval": EvalArgs(eval_batch_size=16)}



def test_ensemble_seeds_stores_the_members_and_ensemble_and_reports_the_validation_gain(tmp_path, tokenizer,
                                                                                        engine_sources):
    out, store_dir = tmp_path / "run", tmp_path / "store"
    store_dir.mkdir()  # an empty folder becomes the store (it was 'not a prompt store' after the whole search)
    model, lines = make_model("llama"), []
    data = with_test_split(task(64, 32))
    result = run_tune(sections(out), TuneArgs(lrs=[1e-3, 0.01], eta=2, ensemble_seeds=3, store=str(store_dir),
                                              task="sent"), model, tokenizer, data, echo=lines.append)
    best = result.best
    assert best.steps == result.plan.horizon == 8  # the winner ran the whole schedule: it is seed 0
    assert [t.id for t in result.seed_runs] == [best.id, f"{best.id}-seed1", f"{best.id}-seed2"]
    assert all(t.status == "ok" and t.steps == 8 and t.spec.lr == best.spec.lr for t in result.seed_runs)

    # the store: the three seed prompts and their mean ensemble
    store = PromptStore(store_dir)
    assert store.names() == ["sent", "sent-1", "sent-2", "sent-3"]
    spec = store.ensemble("sent")
    assert spec.members == ["sent-1", "sent-2", "sent-3"] and spec.combine == "mean"
    tensors = [store.load(m).tensors["prompt_embeddings"] for m in spec.members]
    assert torch.equal(tensors[0], prompt_tensor(best.prompt_dir))  # the winner's own run
    assert not torch.equal(tensors[0], tensors[1]) and not torch.equal(tensors[1], tensors[2])  # seeds differ
    assert [store.load(m).meta["train_config"]["train"]["seed"] for m in spec.members] == [0, 1, 2]

    # the report against an independent evaluation of the stored entries, served by a fresh engine
    report = result.ensembles["seeds"]
    valid = data.examples("validation")
    engine = Engine.from_store(store, model, tokenizer)
    own = evaluate_on_engine(engine, {n: n for n in store.names()}, valid, data.format)
    singles = [own[m]["accuracy"] for m in spec.members]
    assert [m["metrics"]["accuracy"] for m in report["members"]] == singles
    assert len(set(singles)) > 1  # the members disagree: the gain below is not a zero by construction
    assert report["ensemble"]["accuracy"] == own["sent"]["accuracy"]
    assert report["mean_single"]["accuracy"] == pytest.approx(statistics.fmean(singles), abs=1e-12)
    assert report["std_single"]["accuracy"] == pytest.approx(statistics.stdev(singles), abs=1e-12)
    gain = own["sent"]["accuracy"] - statistics.fmean(singles)
    assert gain != 0 and report["gain"]["accuracy"] == pytest.approx(gain, abs=1e-12)
    assert report["gain"]["macro_f1"] == pytest.approx(
        own["sent"]["macro_f1"] - statistics.fmean(own[m]["macro_f1"] for m in spec.members), abs=1e-12)
    # the loss of the mixture the engine scores is at most the members' mean loss: a real gain (below 0)
    assert report["gain"]["loss"] == pytest.approx(
        own["sent"]["loss"] - statistics.fmean(own[m]["loss"] for m in spec.members), abs=1e-12)
    assert report["gain"]["loss"] < 0
    # the members' accuracy also equals the search's own validation evaluation of each run (not the engine's)
    assert singles == [t.last.metrics["accuracy"] for t in result.seed_runs]
    assert report["n"] == len(valid) == 32 and report["split"] == "validation" and report["metric"] == "accuracy"

    # only the validation split was engine_sources (and the test split, which raises on any read, never touched)
    assert engine_sources and all(srcs == [ex.source for ex in valid] for srcs in engine_sources)

    # files and console
    assert json.loads((out / "tune.json").read_text())["ensembles"]["seeds"]["gain"]["accuracy"] == \
        pytest.approx(gain)
    assert json.loads((out / "trials.json").read_text())["ensembles"]["seeds"]["members"][2]["seed"] == 2
    md = (out / "trials.md").read_text()
    assert "## seed ensemble (--ensemble-seeds): validation split, n=32" in md
    assert f"| gain (ensemble - mean single) | | | {gain:+.4f} |" in md
    line = next(ln for ln in lines if ln.startswith("seed ensemble of"))
    assert "(seeds 0, 1, 2) = store entry 'sent'" in line and f"gain {gain:+.4f}" in line
    assert any("added the 3 seed prompts" in ln for ln in lines)


def test_top_k_and_seed_ensembles_without_a_store_and_a_winner_cut_short(tmp_path, tokenizer, engine_sources):
    """No --store: both ensembles are measured in a temporary store; the budget stops the winner before the
    end of its schedule, so every seed is a new run of the whole schedule."""
    out, lines = tmp_path / "run", []
    data = with_test_split(task(64, 32))
    # rungs 4, 8 for 2 -> 1 trials cost 12 steps; 10 pay for rung 0 only
    result = run_tune(sections(out), TuneArgs(lrs=[1e-3, 0.01], eta=2, budget_steps=10, top_k=2, ensemble_seeds=2),
                      make_model("llama"), tokenizer, data, echo=lines.append)
    assert result.stopped_by == "--budget-steps" and result.best.steps == 4
    assert [(t.id, t.seed, t.steps) for t in result.seed_runs] == [(f"{result.best.id}-seed{s}", s, 8)
                                                                   for s in (0, 1)]
    assert any("stopped at step 4 of 8: all 2 seeds are new runs" in n for n in result.notes)
    top = result.ensembles["top_k"]
    assert [m["trial"] for m in top["members"]] == [t.id for t in result.top(2)]
    assert top["store"] is None and not list(tmp_path.glob("**/store.json"))  # the temporary store is gone
    for report, runs in ((top, result.top(2)), (result.ensembles["seeds"], result.seed_runs)):
        values = [m["metrics"]["accuracy"] for m in report["members"]]
        assert values == [t.last.metrics["accuracy"] for t in runs]  # the search's own validation numbers
        assert report["gain"]["accuracy"] == pytest.approx(report["ensemble"]["accuracy"] - statistics.fmean(values))
    assert any(ln.startswith(f"top-2 ensemble ({result.top(2)[0].id}, ") for ln in lines)
    assert "## top-k ensemble (--top-k)" in (out / "trials.md").read_text()
    valid = [ex.source for ex in data.examples("validation")]
    assert len(engine_sources) == 2 and all(s == valid for s in engine_sources)


GEN = TaskFormat("Country: {country}\nCapital:", "capital")


def test_a_generation_task_builds_no_ensemble_and_says_why(tmp_path, tokenizer):
    pairs = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome")]
    recs = [GEN.render({"country": c, "capital": k}) for c, k in pairs * 6]
    data = TaskData(GEN, {"train": recs[:16], "validation": recs[16:]})
    out, store_dir, lines = tmp_path / "run", tmp_path / "store", []
    result = run_tune(sections(out, max_steps=2), TuneArgs(lrs=[0.01], ensemble_seeds=3, store=str(store_dir),
                                                          task="cap"), make_model("llama"), tokenizer, data,
                      echo=lines.append)
    assert any(ln.startswith("--ensemble-seeds 3: no seed ensemble is built: this is a generation task") for ln in
               lines)
    assert result.seed_runs == [] and not (out / "seeds").exists()
    store = PromptStore(store_dir)
    assert store.names() == ["cap"] and store.kind("cap") == "prompt"  # the best prompt, as without the flag
    assert json.loads((out / "tune.json").read_text())["ensembles"]["seeds"]["skipped"].startswith(
        "this is a generation task")
    assert "not built: this is a generation task" in (out / "trials.md").read_text()


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    return tune_args_from_namespace(parser.parse_args(list(argv)))


def test_ensemble_seeds_flag_and_its_conflicts(tmp_path, tokenizer):
    tune, problems = parse("--ensemble-seeds", "4", "--store", str(tmp_path / "s"), "--task", "sent")
    assert problems == [] and tune.ensemble_seeds == 4
    assert "--ensemble-seeds must be >= 2" in "\n".join(parse("--ensemble-seeds", "1")[1])
    both = "\n".join(parse("--ensemble-seeds", "3", "--top-k", "2", "--store", str(tmp_path / "s"), "--task", "t")[1])
    assert "--ensemble-seeds 3 and --top-k 2 both write" in both
    assert parse("--ensemble-seeds", "3", "--top-k", "2")[1] == []  # without --store both are reported
    # an existing prompt where the seed ensemble would go is refused before any training
    store = PromptStore(tmp_path / "store", create=True)
    first = run_tune(sections(tmp_path / "a", max_steps=2), TuneArgs(lrs=[0.01], store=str(store.root), task="x"),
                     make_model("llama"), tokenizer, task(16, 8), echo=id)
    assert first.best is not None and store.kind("x") == "prompt"
    with pytest.raises(ConfigError, match="'x' is a prompt, tune writes an ensemble there"):
        run_tune(sections(tmp_path / "b"), TuneArgs(lrs=[0.01], ensemble_seeds=2, store=str(store.root), task="x"),
                 make_model("llama"), tokenizer, task(16, 8), echo=id)
    assert not (tmp_path / "b").exists()
