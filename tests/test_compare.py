"""The comparison harness on tiny models: every kind trains through the same loop and gets a row; the lr search
reads validation only; seeds give mean ± std; adapters and both BitFit variants train; curves reach the json."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from softprompt.cli import main
from softprompt.compare import (
    CompareSettings,
    Job,
    Spec,
    add_adapters,
    convergence,
    ensure_validation,
    format_row,
    lr_grid,
    resume_problem,
    run_compare,
    run_in_subprocess,
    run_method,
    run_one,
    search_lr,
    select_specs,
    weight_method,
)
from softprompt.compare.specs import method_slug
from softprompt.data import TaskData, TaskFormat, token_counts
from softprompt.evaluate import evaluate_prompt
from tests import test_train_guard
from tests.conftest import make_model, make_tokenizer, sentiment_records

FMT = TaskFormat("Review: {text}\nSentiment:", "label", {"positive": "positive", "negative": "negative"})


def toy_task() -> TaskData:
    """A learnable sentiment task (one word decides the label): 32 train, 16 test, 16 validation examples.

    No text is in two splits, so the texts an evaluation saw tell which split it read.
    """
    recs = sentiment_records(64, seed=2)
    return TaskData(FMT, {"train": [FMT.render(r) for r in recs[:32]], "test": [FMT.render(r) for r in recs[32:48]],
                          "validation": [FMT.render(r) for r in recs[48:]]})


@pytest.fixture
def toy(monkeypatch):
    """Every run loads a fresh copy of :func:`toy_task` (a run edits its splits)."""
    data = toy_task()
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: copy.deepcopy(data))
    return data


def _model_dir(tmp_path_factory, kind: str):
    d = tmp_path_factory.mktemp(f"tiny-{kind}")
    make_model(kind).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def job(model_dir, kind: str, cfg: dict, lr: float, steps: int = 3, **kw) -> Job:
    return Job(Spec(kind, kind, cfg, "adamw", lr), str(model_dir), "x", steps, 8, lr, **{"test_samples": 16, **kw})


def test_weight_methods_train_only_their_parameters():
    model = make_model("gpt2")
    bit = weight_method(model, Spec("BitFit", "bitfit"))
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert bit.label == "BitFit (biases)" and set(bit.state_dict()) == biases
    assert bit.num_trainable() == sum(p.numel() for n, p in model.named_parameters() if n in biases) > 0
    qwen = make_model("qwen2")  # biases on q, k, v only
    assert weight_method(qwen, Spec("BitFit", "bitfit")).label == "BitFit (biases)"
    pytest.importorskip("peft")
    lora_model = make_model("llama")
    lora = weight_method(lora_model, Spec("l", "lora", {"r": 2}))
    assert lora.num_trainable() > 0 and all("lora_" in n for n in lora.state_dict())
    with pytest.raises(ValueError, match="unknown comparison kind"):
        weight_method(make_model("llama"), Spec("x", "dropout"))


def test_bitfit_on_a_model_without_biases_trains_the_norm_gains_and_says_so():
    model = make_model("llama")  # no bias vectors
    bit = weight_method(model, Spec("BitFit", "bitfit"))
    assert bit.label == "BitFit (norm gains; model has no biases)"
    # 2 RMSNorms per layer and the final one, each a gain vector of the hidden size
    assert sorted(bit.state_dict()) == sorted(["model.norm.weight"] + [
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")])
    assert bit.num_trainable() == 5 * 32
    assert all(p.requires_grad for p in bit.params) and sum(p.requires_grad for p in model.parameters()) == 5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adapters_start_as_identity_and_sit_on_attention_and_mlp(kind):
    model = make_model(kind)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    before = model(ids).logits
    adapters, handles = add_adapters(model, 4)
    assert sorted(adapters) == ["0_attn", "0_mlp", "1_attn", "1_mlp"] and len(handles) == 4
    assert adapters["0_attn"].down.weight.shape == (4, 32) and adapters["0_attn"].up.weight.shape == (32, 4)
    assert torch.equal(model(ids).logits, before)  # up starts at zero: the model is unchanged
    for name in ("0_attn", "1_mlp"):  # each hook changes the model's output once its adapter is not zero
        with torch.no_grad():
            adapters[name].up.bias.fill_(0.5)
        assert not torch.allclose(model(ids).logits, before)
        with torch.no_grad():
            adapters[name].up.bias.zero_()
    assert torch.equal(model(ids).logits, before)


def test_adapter_row_trains(tiny_model_dir, toy, monkeypatch):
    import softprompt.train

    losses = []
    real = softprompt.train.train

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        losses.extend(r["loss"] for r in result.history)
        return result

    monkeypatch.setattr(softprompt.train, "train", spy)
    row = run_one(job(tiny_model_dir, "adapter", {"size": 8}, 0.1, steps=12, eval_every=4))
    assert row["trainable_params"] == 4 * (32 * 8 + 8 + 8 * 32 + 32) and row["bytes_per_task"] > 0
    assert sum(losses[-4:]) / 4 < 0.92 * losses[0]  # training loss: 4.11 at the first step, about 3.69 after 12
    assert [p["step"] for p in row["curve"]] == [4, 8, 12]
    assert row["curve"][-1]["loss"] < row["curve"][0]["loss"]


@pytest.mark.parametrize(("arch", "label", "params"), [
    ("llama", "BitFit (norm gains; model has no biases)", 5 * 32),
    ("gpt2", "BitFit (biases)", 2 * (32 + 96 + 32 + 32 + 128 + 32) + 32)])
def test_bitfit_row_trains_on_both_kinds_of_model(tmp_path_factory, toy, arch, label, params):
    row = run_one(job(_model_dir(tmp_path_factory, arch), "bitfit", {}, 0.1, steps=8, eval_every=4))
    assert row["method"] == label and row["trainable_params"] == params
    assert row["curve"][-1]["loss"] < row["curve"][0]["loss"]


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning", "lora", "adapter", "bitfit", "full"])
def test_run_one_trains_and_evaluates_each_kind(tiny_model_dir, toy, kind, monkeypatch):
    import softprompt.evaluate
    import softprompt.train  # before the spy below: train binds evaluate_prompt at import (its validations)

    seen = []  # (prompt_kv, predictions) of every evaluation run_one makes itself (train's are not spied on)

    def spy(*args, **kwargs):
        metrics, preds = evaluate_prompt(*args, **kwargs)
        seen.append((args[2], preds))
        return metrics, preds

    monkeypatch.setattr(softprompt.evaluate, "evaluate_prompt", spy)
    cfg = {"prompt_tuning": {"num_virtual_tokens": 3, "init": "random"},
           "prefix_tuning": {"num_virtual_tokens": 3, "init": "random"}, "lora": {"r": 2},
           "adapter": {"size": 4}}.get(kind, {})
    def no_copies(*args, **kwargs):  # the last state is scored: a best-state copy or a checkpoint is dead weight
        raise AssertionError("a compare run copied its best state or wrote a checkpoint")

    monkeypatch.setattr(softprompt.train, "_cpu_copy", no_copies)  # full fine-tuning: a whole model in RSS
    monkeypatch.setattr(softprompt.train, "save_checkpoint", no_copies)  # and gigabytes of writes in train_s
    row = run_one(job(tiny_model_dir, kind, cfg, 1e-2, eval_every=1))
    # the fp32 tensors a task stores, alike for every kind: a prompt's folder had its JSON and headers counted
    stored = {"prompt_tuning": 3 * 32, "prefix_tuning": 3 * 2 * 2 * 16}.get(kind, row["trainable_params"])
    assert row["trainable_params"] > 0 and row["bytes_per_task"] == 4 * stored
    # the reported accuracy is the test split's, recomputed here from the predictions it was made of
    (kv, preds), = seen
    assert [p.expected for p in preds] == [ex.label for ex in toy.examples("test")]
    assert row["accuracy"] == sum(p.expected == p.predicted for p in preds) / 16
    assert (kv is None) == (kind in ("lora", "adapter", "bitfit", "full"))  # prompts are evaluated with them
    assert [p["step"] for p in row["curve"]] == [1, 2, 3] and row["guard"] == (kind != "full")
    if kind == "full":
        assert row["trainable_params"] == sum(p.numel() for p in make_model("llama").parameters())


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_run_one_learns_the_toy_task_the_untrained_model_cannot(tiny_model_dir, toy, kind):
    untrained, _ = evaluate_prompt(make_model("llama"), make_tokenizer(), None, toy.examples("test"), FMT)
    assert untrained["accuracy"] <= 9 / 16  # the random tiny model is at chance
    cfg, lr = ({"r": 2}, 0.1) if kind == "lora" else ({}, 1e-2)
    assert run_one(job(tiny_model_dir, kind, cfg, lr, steps=16))["accuracy"] == 1.0


def test_a_run_selects_by_macro_f1_as_train_does_where_one_label_dominates_validation(tiny_model_dir, monkeypatch):
    data = toy_task()
    valid = data.splits["validation"]
    data.splits["validation"] = ([ex for ex in valid if ex.label == "positive"][:6]
                                 + [ex for ex in valid if ex.label == "negative"][:2])  # 75%
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: copy.deepcopy(data))
    row = run_one(job(tiny_model_dir, "prompt_tuning", {"num_virtual_tokens": 3, "init": "random"}, 1e-2,
                      eval_every=1))
    assert row["metric"] == "macro_f1" and all("macro_f1" in p for p in row["curve"])
    assert isinstance(row["macro_f1"], float)  # reported on test beside accuracy (its value: the next test)
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: toy_task())  # validation half and half
    balanced = run_one(job(tiny_model_dir, "prompt_tuning", {"num_virtual_tokens": 3, "init": "random"}, 1e-2,
                           eval_every=1))
    # ranked by accuracy, but every metric recorded (a journalled run serves a comparison ranked by either)
    assert balanced["metric"] == "accuracy" and [p["step"] for p in balanced["curve"]] == [1, 2, 3]
    assert all({"loss", "accuracy", "macro_f1"} <= set(p) for p in balanced["curve"])
    assert isinstance(balanced["macro_f1"], float) and isinstance(balanced["accuracy"], float)


def test_a_row_selected_by_macro_f1_reports_its_mean_and_std_beside_accuracy():
    def runner(j):
        return {**_fake_seed_run(j), "macro_f1": [0.4, 0.5, 0.6][j.seed]}

    settings = CompareSettings("m", steps=6, seeds=3, lr_search=False, eval_every=2, metric="macro_f1")
    row = run_method(Spec("pt", "prompt_tuning", lr=0.3), settings, runner, log=lambda s: None)
    assert row["macro_f1"] == pytest.approx(0.5) and row["macro_f1_std"] == pytest.approx(0.1)
    assert "| 0.7000 ± 0.2000 (macro-F1 0.5000 ± 0.1000) | 3 |" in format_row(row)
    # every run reports its test macro-F1 (a journalled run can serve either metric): shown only where it ranks
    plain = run_method(Spec("pt", "prompt_tuning", lr=0.3), replace(settings, metric="accuracy"), runner,
                       log=lambda s: None)
    assert "macro_f1" not in plain and "macro-F1" not in format_row(plain)


def test_lr_search_scores_on_validation_and_never_reads_test(tiny_model_dir, toy, monkeypatch):
    import softprompt.evaluate
    import softprompt.train

    evaluated = []  # the source texts of every evaluation, wherever it is made

    def spy(model, tok, kv, examples, *args, **kwargs):
        evaluated.append([ex.source for ex in examples])
        return evaluate_prompt(model, tok, kv, examples, *args, **kwargs)

    monkeypatch.setattr(softprompt.evaluate, "evaluate_prompt", spy)
    monkeypatch.setattr(softprompt.train, "evaluate_prompt", spy)
    splits = []  # the splits of the task each run trained with
    real_train = softprompt.train.train

    def train_spy(model, tok, method, task, *args, **kwargs):
        splits.append(sorted(task.splits))
        return real_train(model, tok, method, task, *args, **kwargs)

    monkeypatch.setattr(softprompt.train, "train", train_spy)
    jobs, runs = [], []

    def runner(j):
        jobs.append(j)
        runs.append(run_one(j))
        return runs[-1]

    settings = CompareSettings(str(tiny_model_dir), "x", steps=8, batch_size=8, val_samples=16, lr_grid=3, lr_extend=0,
                               search_steps=4)
    lr, record = search_lr(Spec("lora", "lora", {"r": 2}, "adamw", 1e-2), settings, runner, log=lambda s: None)
    assert [j.lr for j in jobs] == lr_grid(1e-2, 3) == [0.00316, 0.01, 0.0316]
    # seed 3, which the seed runs (0, 1, 2) do not use: with seed 0, seed run 0 shared the chosen candidate's init
    # and data order, and the lr picked for doing best on them biased that run's test score
    assert all(j.test_samples == 0 and j.steps == 4 and j.seed == settings.seeds == 3
               and j.schedule == settings.schedule == "wsd" for j in jobs)  # the candidates train as the seeds will
    assert all("accuracy" not in r for r in runs)  # no test score was made
    assert splits == [["train", "validation"]] * 3  # the test split was dropped as soon as it was loaded
    validation = sorted(ex.source for ex in toy.examples("validation"))
    test = {ex.source for ex in toy.examples("test")}
    assert not test & set(validation)
    assert len(evaluated) == 3 and all(sorted(srcs) == validation for srcs in evaluated)
    assert not any(s in test for srcs in evaluated for s in srcs)
    cands = record["candidates"]
    assert [c["val_accuracy"] for c in cands] == [r["curve"][-1]["accuracy"] for r in runs]
    best = max(cands, key=lambda c: (c["val_accuracy"], -c["val_loss"]))
    assert lr == record["chosen"] == best["lr"]


def test_lr_search_ranks_failed_and_diverged_candidates_last_and_breaks_ties_by_loss(tmp_path):
    def fake(j):  # validation (accuracy, loss, diverged) per lr
        results = {0.1: None, 0.316: (0.8, 0.5, False), 1.0: (0.9, 0.3, True), 3.16: (0.8, 0.4, False),
                   10.0: (0.8, 0.45, False)}
        if results[j.lr] is None:
            return {"lr": j.lr, "error": "RuntimeError: boom"}
        acc, loss, diverged = results[j.lr]
        run = {"lr": j.lr, "metric": "accuracy", "higher_is_better": True, "curve": [{"step": 5, "loss": loss,
               "accuracy": acc}], "rollbacks": 6 if diverged else 0, "diverged": diverged, "train_s": 1.0}
        return {**run, "events": [{"step": 4, "event": "diverged", "reason": "r"}]} if diverged else run

    settings = CompareSettings("m", lr_grid=5)
    lr, record = search_lr(Spec("x", "prompt_tuning", lr=1.0), settings, fake, log=lambda s: None)
    assert lr == 3.16 and record["chosen"] == 3.16
    assert record["candidates"][0] == {"lr": 0.1, "error": "RuntimeError: boom"}
    assert record["candidates"][2]["diverged"] and record["candidates"][2]["rollbacks"] == 6
    assert record["candidates"][2]["events"] == [{"step": 4, "event": "diverged", "reason": "r"}]
    assert "events" not in record["candidates"][1]  # a run that did not record them (journalled before) claims none
    assert search_lr(Spec("x", "prompt_tuning"), settings, lambda j: {"lr": j.lr, "error": "E"},
                     log=lambda s: None)[0] is None


def test_a_candidate_the_guard_ended_before_its_only_validation_ranks_last(tmp_path):
    """A search run validates once, after its last step: one the guard ended earlier comes back with no curve
    (its progress line raised an IndexError, which killed the whole comparison)."""
    def fake(j):
        if j.lr > 1:
            return {"lr": j.lr, "metric": "accuracy", "higher_is_better": True, "curve": [], "rollbacks": 6,
                    "diverged": True, "steps_run": 17, "train_s": 1.0}
        return {"lr": j.lr, "metric": "accuracy", "higher_is_better": True, "curve": [{"step": 60, "loss": 0.4,
                "accuracy": 0.8 if j.lr < 1 else 0.85}], "rollbacks": 0, "diverged": False, "train_s": 1.0}

    lines = []
    lr, record = search_lr(Spec("x", "prompt_tuning", lr=1.0), CompareSettings("m"), fake, log=lines.append)
    assert lr == 1.0 and record["candidates"][2]["diverged"] and math.isnan(record["candidates"][2]["val_loss"])
    assert lines[2] == "  x: lr 3.16 -> diverged at step 17 (6 rollbacks), never validated"



def _peaked_at(peak: float):
    """A search runner whose validation accuracy falls by 0.05 per half-decade from ``peak`` (its loss: 1 - it)."""
    def fake(j):
        acc = 0.9 - 0.1 * abs(math.log10(j.lr / peak))
        return {"lr": j.lr, "metric": "accuracy", "higher_is_better": True, "rollbacks": 0, "diverged": False,
                "curve": [{"step": 60, "loss": 1 - acc, "accuracy": acc}], "train_s": 1.0}
    return fake


def test_the_search_goes_beyond_an_edge_that_wins_and_marks_a_choice_still_there():
    """Five of the seven rows of the README's comparison chose the lowest or the highest of their three lrs: an
    optimum the search had not bracketed, reported as if it had."""
    lines = []
    spec = Spec("x", "prompt_tuning", lr=0.1)  # the grid: 0.0316, 0.1, 0.316
    lr, record = search_lr(spec, CompareSettings("m"), _peaked_at(0.01), log=lines.append)
    assert [c["lr"] for c in record["candidates"]] == [0.0316, 0.1, 0.316, 0.01, 0.00316]
    assert lr == record["chosen"] == 0.01 and "edge" not in record  # bracketed by its second extension
    assert [c.get("beyond_grid", False) for c in record["candidates"]] == [False] * 3 + [True] * 2
    assert lines[3] == "  x: lr 0.01 -> validation accuracy 0.9000, loss 0.1000 (beyond the grid's edge)"
    lr, record = search_lr(spec, CompareSettings("m"), _peaked_at(0.1), log=lambda s: None)
    assert lr == 0.1 and len(record["candidates"]) == 3 and "edge" not in record  # bracketed by the grid
    lr, record = search_lr(spec, CompareSettings("m"), _peaked_at(100.0), log=lambda s: None)
    assert [c["lr"] for c in record["candidates"]] == [0.0316, 0.1, 0.316, 1.0, 3.16]
    assert lr == 3.16 and record["edge"] == "upper"  # the extensions ran out
    lr, record = search_lr(spec, CompareSettings("m", lr_extend=0), _peaked_at(0.01), log=lambda s: None)
    assert [c["lr"] for c in record["candidates"]] == [0.0316, 0.1, 0.316] and record["edge"] == "lower"

    def diverging_above(j):  # an extension the guard ends bounds the range: the choice below it is bracketed
        run = _peaked_at(100.0)(j)
        return {**run, "diverged": True, "curve": []} if j.lr > 1.5 else run

    lr, record = search_lr(spec, CompareSettings("m"), diverging_above, log=lambda s: None)
    assert [c["lr"] for c in record["candidates"]] == [0.0316, 0.1, 0.316, 1.0, 3.16]
    assert lr == 1.0 and "edge" not in record

    def runner(j):  # the search's runs, then the seed runs
        return _peaked_at(100.0)(j) if j.test_samples == 0 else _fake_seed_run(j)

    row = run_method(spec, CompareSettings("m", steps=6, seeds=2, eval_every=2), runner, log=lambda s: None)
    assert row["lr"] == 3.16 and "| 3.16 (search; at its upper edge) |" in format_row(row)
    del row["lr_search"]["edge"]  # a search recorded before it said so: read from its candidates
    assert "| 3.16 (search; at its upper edge) |" in format_row(row)
    row["lr_search"]["candidates"].append({"lr": 10.0, "val_accuracy": 0.5, "val_loss": 0.5, "diverged": False})
    assert "| 3.16 (search) |" in format_row(row)

def test_the_search_never_picks_an_lr_whose_run_crashed():
    # with the others diverged, every score tied and max() returned the first candidate: the one that crashed
    def fake(j):
        if j.lr < 1:
            return {"lr": j.lr, "error": "RuntimeError: CUDA out of memory"}
        return {"lr": j.lr, "metric": "accuracy", "higher_is_better": True, "curve": [], "rollbacks": 6,
                "diverged": True, "steps_run": 17, "train_s": 1.0}

    lr, record = search_lr(Spec("x", "prompt_tuning", lr=1.0), CompareSettings("m"), fake, log=lambda s: None)
    assert lr in (1.0, 3.16) and record["chosen"] == lr


def _fake_seed_run(j):
    metric = "accuracy" if j.metric == "auto" else j.metric  # the comparison's, as run_one's
    return {"method": "pt", "kind": "prompt_tuning", "seed": j.seed, "lr": j.lr, "steps": j.steps,
            "trainable_params": 96, "bytes_per_task": 1000, "train_s": 10.0 + j.seed, "metric": metric,
            "higher_is_better": True, "validation": "v", "accuracy": [0.5, 0.7, 0.9][j.seed],
            "macro_f1": [0.45, 0.65, 0.85][j.seed],  # as run_one: every validation metric, test macro-F1 too
            "curve": [{"step": s, "loss": 2.0 - 0.1 * s - 0.01 * j.seed, "accuracy": 0.5, "macro_f1": 0.45, metric: 0.5}
                      for s in (2, 4, 6)],
            "rollbacks": [0, 2, 1][j.seed], "diverged": False, "lr_scale": 1.0, "guard": True, "peak_mib": 100.0}


def test_with_fixed_steps_under_wsd_the_verdict_is_read_where_the_decay_starts():
    # the decay's own fall (the schedule's, over the last quarter) read as a slope that more steps would follow:
    # a run flat from step 20 to the decay was reported "no: 40 (+10%)"
    from softprompt.compare.harness import summarise

    flat_then_decay = [1.0, 0.6, 0.5, 0.5, 0.5, 0.5, 0.45, 0.45]  # every 5 steps to 40; the decay from step 30
    runs = []
    for seed in (0, 1):
        run = _fake_seed_run(Job(Spec("x", "prompt_tuning"), "m", "d", 40, 8, 0.1, seed=seed))
        run.update(steps_run=40, curve=[{"step": 5 * (i + 1), "loss": v, "accuracy": 0.5}
                                        for i, v in enumerate(flat_then_decay)])
        runs.append(run)
    fixed = {"steps": 40, "seeds": 2, "lr_search": False, "eval_every": 5, "until_flat": False}
    row = summarise(Spec("x", "prompt_tuning"), runs, None, CompareSettings("m", **fixed, schedule="wsd"))
    assert row["converged"] is True and row["last_third_gain"] == [0.0, 0.0]  # 0.5 at step 20, 0.5 after
    row = summarise(Spec("x", "prompt_tuning"), runs, None, CompareSettings("m", **fixed, schedule="linear"))
    assert row["converged"] is False and row["last_third_gain"] == [0.1, 0.1]  # linear: at its last step


def test_seeds_give_mean_and_std_over_every_run():
    jobs = []
    settings = CompareSettings("m", steps=6, seeds=3, lr_search=False, eval_every=2)
    row = run_method(Spec("pt", "prompt_tuning", lr=0.3), settings, lambda j: jobs.append(j) or _fake_seed_run(j),
                     log=lambda s: None)
    assert [(j.seed, j.lr, j.steps, j.eval_every, j.test_samples) for j in jobs] == [
        (s, 0.3, 6, 2, 400) for s in range(3)]
    assert row["n_seeds"] == 3 and row["accuracy"] == pytest.approx(0.7)
    assert row["accuracy_std"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9
    assert [r["accuracy"] for r in row["seeds"]] == [0.5, 0.7, 0.9] and row["train_s"] == 11.0
    assert row["rollbacks"] == 3 and row["lr_search"] is None
    assert [p["loss"] for p in row["curve"]] == pytest.approx([1.79, 1.59, 1.39])  # mean over the seeds
    assert "| 0.3 (fixed) | 0.7000 ± 0.2000 | 3 | 3 |" in format_row(row)
    # each seed's loss fell by about 12.5% over the last third of its 6 steps: not converged, and said so
    assert row["converged"] is False and format_row(row).endswith("| no: 6 (+12.5%), 6 (+12.6%), 6 (+12.7%) |")
    one = run_method(Spec("pt", "prompt_tuning"), CompareSettings("m", seeds=1, lr_search=False), _fake_seed_run,
                     log=lambda s: None)
    assert one["n_seeds"] == 1 and one["accuracy_std"] is None and "| 0.5000 | 1 |" in format_row(one)


def test_the_time_column_gives_the_fastest_seeds_time_per_step_and_the_mean_seed_time():
    """Seeds of 10, 11 and 12 s that stopped at 2, 4 and 6 steps: 2.00 s/step is seed 2's (seed 0 was the
    shortest run, not the fastest per step); the mean seed ran 11 s."""
    def runner(j):
        return {**_fake_seed_run(j), "steps_run": [2, 4, 6][j.seed]}

    row = run_method(Spec("pt", "prompt_tuning", lr=0.3), CompareSettings("m", steps=6, seeds=3, lr_search=False,
                                                                          eval_every=2), runner, log=lambda s: None)
    assert "| 100 MiB | 2.00 s/step, 11 s | 0.3 (fixed) |" in format_row(row)


def test_a_seed_the_guard_ended_is_not_converged_and_the_table_says_diverged():
    """--fixed-steps read a diverged seed's verdict where it stopped (a rising loss counts as flat): "yes"."""
    def runner(j):
        run = _fake_seed_run(j)
        if j.seed == 1:  # ended at step 4 with a rising loss
            run.update(diverged=True, steps_run=4, curve=[{"step": 2, "loss": 1.0, "accuracy": 0.5},
                                                          {"step": 4, "loss": 3.0, "accuracy": 0.5}])
        return run

    lines = []
    for until_flat in (True, False):
        settings = CompareSettings("m", steps=6, seeds=3, lr_search=False, eval_every=2, until_flat=until_flat)
        row = run_method(Spec("pt", "prompt_tuning", lr=0.3), settings, runner, log=lines.append)
        assert row["converged"] is False and row["diverged_seeds"] == 1
        assert ", 4 (diverged), " in format_row(row) and row["accuracy"] == pytest.approx(0.7)
    assert "  pt: seed 1 -> test accuracy 0.7000, 2 rollbacks; the guard ended it at step 4 (diverged)" in lines


def test_data_without_a_validation_split_holds_out_the_same_train_examples_every_run():
    def task():
        data = toy_task()
        del data.splits["validation"]
        return data

    first, second = task(), task()
    assert ensure_validation(first, 200) == "6 train examples held out (the dataset has no validation split)"
    ensure_validation(second, 200)
    held = [ex.source for ex in first.splits["validation"]]
    assert held == [ex.source for ex in second.splits["validation"]] and len(first.splits["train"]) == 26
    assert not set(held) & {ex.source for ex in first.splits["train"]}
    assert ensure_validation(toy_task(), 4) == "validation split (16 examples)"  # an existing split is kept
    # copies of one example go to one side (held out by position, a duplicated review was in both)
    dup = task()
    dup.splits["train"] = [ex for ex in dup.splits["train"] for _ in range(2)]
    ensure_validation(dup, 200)
    assert not {ex.source for ex in dup.splits["validation"]} & {ex.source for ex in dup.splits["train"]}


def test_convergence_is_the_last_third_gain_of_the_validation_loss():
    def curve(*losses):
        return [{"step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)]

    # 60 steps: the reference is the loss at step 40, the best after it is compared with it
    assert convergence(curve(3, 2, 1.5, 1.0, 0.99, 0.995), 60, 0.02) == (True, 0.01)
    assert convergence(curve(3, 2, 1.5, 1.0, 0.9, 0.8), 60, 0.02) == (False, 0.2)
    assert convergence(curve(3, 2, 1.5, 1.0, 1.2, 1.5), 60, 0.02) == (True, -0.2)  # rising again: flat
    assert convergence(curve(3, 2), 60, 0.02) == (None, None)  # no point in the last third
    assert convergence(curve(3, 2, 1.5, 1.0, float("nan"), 1.0), 60, 0.02) == (False, None)


def test_compare_keeps_curves_seeds_and_search_in_json(tiny_model_dir, toy, tmp_path):
    settings = CompareSettings(str(tiny_model_dir), "x", steps=6, batch_size=8, test_samples=16, val_samples=16,
                               eval_every=2, seeds=2, lr_grid=2, lr_extend=0, search_steps=2)
    rows = run_compare([Spec("adapter", "adapter", {"size": 4}, "adamw", 1e-2),
                        Spec("BitFit", "bitfit", {}, "adamw", 1e-2)], settings, tmp_path, log=lambda s: None,
                       runner=run_one)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["settings"]["seeds"] == 2 and saved["settings"]["search_steps"] == 2
    for row in saved["rows"]:
        assert [c["lr"] for c in row["lr_search"]["candidates"]] == [0.00562, 0.0178]
        assert row["lr"] == row["lr_search"]["chosen"] and row["n_seeds"] == 2
        assert [s["seed"] for s in row["seeds"]] == [0, 1] and all(s["lr"] == row["lr"] for s in row["seeds"])
        assert [[p["step"] for p in s["curve"]] for s in row["seeds"]] == [[2, 4, 6]] * 2
        assert [p["step"] for p in row["curve"]] == [2, 4, 6] and all(p["n"] == 2 for p in row["curve"])
        assert row["converged"] in (True, False) and row["rollbacks"] == 0
    assert saved["rows"][1]["method"] == "BitFit (norm gains; model has no biases)"
    assert (tmp_path / "compare_curves.png").stat().st_size > 0 and (tmp_path / "compare.png").stat().st_size > 0
    assert "| BitFit (norm gains; model has no biases) |" in (tmp_path / "compare.md").read_text()


def test_compare_command_runs_each_method_in_subprocesses(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", str(tiny_model_dir), "--dataset", "capitals", "--steps", "2", "--batch-size",
               "4", "--test-samples", "4", "--val-samples", "4", "--eval-every", "1", "--seeds", "1", "--lr-grid",
               "2", "--lr-extend", "0", "--search-steps", "1", "--only", "bitfit", "--output-dir", str(out)])
    assert rc == 0
    row, = json.loads((out / "compare.json").read_text())["rows"]
    assert row["method"] == "BitFit (norm gains; model has no biases)" and row["metric"] == "exact_match"
    assert len(row["lr_search"]["candidates"]) == 2 and row["n_seeds"] == 1 and row["accuracy_std"] is None
    assert all(s["peak_mib"] > 0 for s in row["seeds"]) and len(row["curve"]) == 2
    assert (out / "compare_curves.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "lr searched over 2 values (1 steps each, on validation), seeds: 1" in text and "| guard rollbacks |" in text


def test_a_failed_child_run_is_a_row_with_its_error(tiny_model_dir):
    row = run_in_subprocess(Job(Spec("nope", "nope"), str(tiny_model_dir), "capitals", 1, 2, 0.1, test_samples=2))
    assert row["method"] == "nope" and "nope" in row["error"]

def test_seed_runs_stop_once_their_validation_loss_is_flat(tiny_model_dir, toy, monkeypatch):
    import softprompt.train

    jobs, lrs = [], []

    def runner(j):
        jobs.append(j)
        return run_one(j)

    def train(*args, **kwargs):  # the lr of every step each run took
        result = train_fn(*args, **kwargs)
        lrs.append([r["lr"] for r in result.history])
        return result

    train_fn = softprompt.train.train
    monkeypatch.setattr(softprompt.train, "train", train)
    # lr 1e-9: the validation loss never moves, so each seed run is flat at step 14 and cools down until 20
    spec = Spec("BitFit", "bitfit", {}, "adamw", 1e-9)
    settings = CompareSettings(str(tiny_model_dir), "x", steps=40, batch_size=8, test_samples=16, val_samples=16,
                               eval_every=2, seeds=2, lr_search=False)
    row = run_method(spec, settings, runner, log=lambda s: None)
    assert [j.stop_when_flat for j in jobs] == [0.02, 0.02] and [j.schedule for j in jobs] == ["wsd", "wsd"]
    assert row["steps_run"] == [20, 20] and [r["flat_step"] for r in row["seeds"]] == [14, 14]
    # the default wsd schedule: after the 10 warmup steps the lr stays at its peak until the plateau (a linear
    # decay over the 40 steps had it at 0.9 of it by step 14), then the cool-down takes it to 0 at step 20
    # (a history row's lr is the one its next step takes)
    assert lrs[0][8:14] == pytest.approx([1e-9] * 6, rel=1e-6) and lrs[0][14:] == pytest.approx(
        [1e-9 * k / 6 for k in (5, 4, 3, 2, 1, 0)], rel=1e-6)
    assert row["converged"] is True and format_row(row).endswith("| yes: 20, 20 |")
    # --fixed-steps: every seed run trains the whole budget
    fixed = run_method(spec, CompareSettings(**{**settings.__dict__, "steps": 16, "until_flat": False}), runner,
                       log=lambda s: None)
    assert [j.stop_when_flat for j in jobs[2:]] == [0.0, 0.0] and fixed["steps_run"] == [16, 16]
    assert [r["flat_step"] for r in fixed["seeds"]] == [None, None]


def test_resume_keeps_the_rows_that_ran_and_runs_the_others(tmp_path):
    jobs = []

    def runner(j):
        jobs.append(j.spec.label)
        return _fake_seed_run(j)

    settings = CompareSettings("m", steps=6, seeds=2, lr_search=False, eval_every=2)
    a, b, c = (Spec(x, "prompt_tuning") for x in "abc")
    first = run_compare([a, c], settings, tmp_path, log=lambda s: None, runner=runner)
    first[1] = {"method": "c", "kind": "prompt_tuning", "error": "RuntimeError: killed"}  # c failed that time
    saved = json.loads((tmp_path / "compare.json").read_text())
    (tmp_path / "compare.json").write_text(json.dumps({**saved, "rows": [saved["rows"][0], first[1]]}))
    (tmp_path / "runs.jsonl").unlink()  # written before the run journal: c's runs are not there
    jobs.clear()
    rows = run_compare([a, b, c], settings, tmp_path, log=lambda s: None, runner=runner, resume=True)
    assert jobs == ["b", "b", "c", "c"]  # a is kept; b is new; c failed before, so it runs again
    assert rows[0] == saved["rows"][0] and [r["spec"] for r in rows] == ["a", "b", "c"]
    assert [r["spec"] for r in json.loads((tmp_path / "compare.json").read_text())["rows"]] == ["a", "b", "c"]
    # --resume with fewer specs keeps the others' rows in the file, in their place (they were dropped)
    jobs.clear()
    rows = run_compare([b], settings, tmp_path, log=lambda s: None, runner=runner, resume=True)
    assert jobs == [] and [r["spec"] for r in rows] == ["b"]
    assert [r["spec"] for r in json.loads((tmp_path / "compare.json").read_text())["rows"]] == ["a", "b", "c"]
    assert not (tmp_path / ".compare.json.tmp").exists()
    # a spec whose lr centre (or optimizer, or config) changed under the same label is run again, not kept
    rows = run_compare([Spec("a", "prompt_tuning", lr=0.5)], settings, tmp_path, log=lambda s: None,
                       runner=runner, resume=True)
    assert jobs == ["a", "a"] and rows[0]["spec_def"]["lr"] == 0.5
    other = CompareSettings("m", steps=8, seeds=2, lr_search=False, eval_every=2)
    assert "steps (6 there, 8 now)" in resume_problem(tmp_path, other)
    with pytest.raises(ValueError, match="other settings"):
        run_compare([a], other, tmp_path, log=lambda s: None, runner=runner, resume=True)
    assert resume_problem(tmp_path / "none", other) is None  # nothing to keep: nothing refused


def test_a_slow_rows_seed_runs_get_its_larger_budget_and_older_records_still_match(tmp_path):
    # random-init prompt tuning was still falling at 400 steps (one seed in three): its row has twice the budget
    from softprompt.compare.journal import job_key
    from softprompt.compare.specs import DEFAULT_SPECS

    jobs, job_keys = [], []

    def runner(j):
        jobs.append((j.spec.label, j.seed, j.steps))
        job_keys.append(job_key(j))
        return {**_fake_seed_run(j), "steps_run": j.steps}

    settings = CompareSettings("m", steps=6, seeds=2, lr_search=True, lr_grid=2, lr_extend=0, eval_every=2,
                               search_steps=4)
    slow, plain = Spec("slow", "prompt_tuning", steps_scale=2), Spec("plain", "prompt_tuning")
    plain_slow = Spec("slow", "prompt_tuning")  # the search's runs are journalled as before the scale was set
    rows = run_compare([slow, plain], settings, tmp_path, log=lambda s: None, runner=runner)
    # the lr search's runs are as long as every row's; the seed runs get 2 x --steps
    assert job_keys[:2] == [job_key(Job(plain_slow, "m", "rotten_tomatoes", 4, 16, lr, seed=2, eval_every=0,
                                        test_samples=0, schedule="wsd")) for lr in (0.169, 0.533)]
    assert jobs == [("slow", 2, 4), ("slow", 2, 4), ("slow", 0, 12), ("slow", 1, 12),
                    ("plain", 2, 4), ("plain", 2, 4), ("plain", 0, 6), ("plain", 1, 6)]
    assert [r["steps"] for r in rows] == [12, 6] and rows[0]["spec_def"]["steps_scale"] == 2
    assert format_row(rows[0]).endswith(", 12 (at most 12) |") and "at most" not in format_row(rows[1])
    # rows and journal lines recorded before the field existed carry no steps_scale: a scale-1 spec still matches
    assert "steps_scale" not in rows[1]["spec_def"]
    old_job = json.loads(Job(plain, "m", "d", 6, 8, 0.1).to_json())
    assert "steps_scale" not in old_job["spec"]
    assert job_key(Job.from_json(json.dumps(old_job))) == job_key(Job(plain, "m", "d", 6, 8, 0.1))
    jobs.clear()
    assert run_compare([slow, plain], settings, tmp_path, log=lambda s: None, runner=runner, resume=True) == rows
    assert jobs == []
    assert {s.label for s in DEFAULT_SPECS if s.steps_scale == 2} == {"prompt tuning, random init, P=20",
                                                                      "prompt tuning, sampled vocab, P=20",
                                                                      "P-tuning (MLP), P=20",
                                                                      "LoRA r=8 (q,v) via PEFT"}


class _Killed(BaseException):
    """The process was killed in the middle of a run (nothing after it ran)."""


def test_resume_continues_inside_an_unfinished_row_from_the_run_journal(tmp_path):
    # compare.json gets a row only when its lr search and every seed are done: a kill in a row's last seed lost
    # its 2 search runs and the seeds before (up to 25 minutes a row on 2 CPU cores), all run again on --resume
    from softprompt.compare.journal import JOURNAL

    jobs, kill_at = [], [None]

    def runner(j):
        if (j.spec.label, j.seed) == kill_at[0]:
            raise _Killed
        jobs.append((j.spec.label, j.lr, j.seed))
        if j.seed < 3:
            return _fake_seed_run(j)
        return {**_fake_seed_run(Job(j.spec, "m", "d", j.steps, 8, j.lr, metric=j.metric)), "seed": j.seed}  # search

    settings = CompareSettings("m", steps=6, seeds=3, lr_search=True, lr_grid=2, lr_extend=0, eval_every=2)
    a, b = Spec("a", "prompt_tuning"), Spec("b", "prompt_tuning")
    whole = run_compare([a, b], settings, tmp_path / "whole", log=lambda s: None, runner=runner)
    assert len(jobs) == 10
    jobs.clear()
    kill_at[0] = ("b", 2)  # killed in b's last seed: a's row is in compare.json, b's search and 2 seeds are not
    with pytest.raises(_Killed):
        run_compare([a, b], settings, tmp_path / "cut", log=lambda s: None, runner=runner)
    assert len(jobs) == 9 and len((tmp_path / "cut" / JOURNAL).read_text().splitlines()) == 9
    with open(tmp_path / "cut" / JOURNAL, "a") as f:  # and a line the kill cut short
        f.write('{"job": {"spec": {"label": "b"')
    jobs.clear()
    kill_at[0] = None
    lines = []
    rows = run_compare([a, b], settings, tmp_path / "cut", log=lines.append, runner=runner, resume=True)
    assert jobs == [("b", rows[1]["lr"], 2)]  # only the run that was cut
    assert sum("kept from" in line and "runs.jsonl" in line for line in lines) == 4  # b's search and seeds 0, 1
    assert rows == whole
    assert len((tmp_path / "cut" / JOURNAL).read_text().splitlines()) == 10  # the cut line dropped, the new run in
    # a run journalled for another job (here another budget) is not taken; without --resume the journal restarts
    jobs.clear()
    run_compare([b], CompareSettings(**{**settings.__dict__, "steps": 8}), tmp_path / "cut", log=lambda s: None,
                runner=runner)
    assert len(jobs) == 5 and len((tmp_path / "cut" / JOURNAL).read_text().splitlines()) == 5


def _budget_job(steps: int, schedule: str = "wsd", **spec) -> Job:
    return Job(Spec("a", "prompt_tuning", **spec), "m", "d", steps, 16, 0.1, eval_every=10, test_samples=400,
               stop_when_flat=0.02, schedule=schedule)


def test_a_run_of_another_budget_is_the_same_run_only_where_that_budget_never_acted():
    from softprompt.compare.journal import same_run

    stopped = {"flat_step": 250, "steps_run": 340, "diverged": False}  # cool-down: 250 -> 340 (a third, rounded)
    # under wsd the cool-down replaces the decay (from step 300 of 400): the lr of steps 0-339 is the same
    assert same_run(stopped, _budget_job(400), _budget_job(800, steps_scale=2))
    assert same_run(stopped, _budget_job(400), _budget_job(600))
    assert same_run(stopped, _budget_job(800), _budget_job(400))
    # linear decays over all the steps: the budget acted from the end of the warmup on
    assert not same_run(stopped, _budget_job(400, "linear"), _budget_job(800, "linear"))
    assert not same_run(stopped, _budget_job(400), _budget_job(300))  # 300 steps cut the cool-down
    assert not same_run({"flat_step": 330, "steps_run": 400}, _budget_job(400), _budget_job(800))  # cut at 400
    assert not same_run({"flat_step": None, "steps_run": 400}, _budget_job(400), _budget_job(800))  # never flat
    assert not same_run({**stopped, "diverged": True}, _budget_job(400), _budget_job(800))
    assert not same_run(stopped, _budget_job(400), replace(_budget_job(800), lr=0.2))  # another job


def test_a_larger_budget_takes_the_journalled_runs_it_could_not_have_changed(tmp_path):
    # a row given twice the budget (steps_scale 2) ran its 3 seeds again, 10 to 15 minutes each on 2 CPU cores,
    # although two of them had stopped after their plateau's cool-down, which the budget never acted on
    from softprompt.plateau import cooldown_end

    jobs, flat = [], {0: 20, 1: None}  # seed 0 is flat at step 20 and stops after its cool-down; seed 1 never

    def runner(j):
        jobs.append((j.seed, j.steps))
        ran = cooldown_end(flat[j.seed], j.eval_every, j.steps) if flat[j.seed] else j.steps
        return {**_fake_seed_run(j), "flat_step": flat[j.seed], "steps_run": ran, "accuracy": 0.5 + j.steps / 1000}

    for schedule in ("wsd", "linear"):
        out, jobs[:] = tmp_path / schedule, []
        settings = CompareSettings("m", steps=40, seeds=2, lr_search=False, eval_every=2, schedule=schedule)
        first = run_compare([Spec("a", "prompt_tuning")], settings, out, log=lambda s: None, runner=runner)
        assert jobs == [(0, 40), (1, 40)] and first[0]["steps_run"] == [28, 40]
        jobs.clear()
        lines = []
        again = run_compare([Spec("a", "prompt_tuning", steps_scale=2)], settings, out, log=lines.append,
                            runner=runner, resume=True)
        if schedule == "linear":  # its decay depended on the budget from the start: both run again
            assert jobs == [(0, 80), (1, 80)] and again[0]["steps_run"] == [28, 80]
            continue
        assert jobs == [(1, 80)]  # seed 0 stopped at 28, before the decay of either budget
        kept, before = again[0]["seeds"][0], first[0]["seeds"][0]
        assert kept == {**before, "steps": 80} and kept["accuracy"] == 0.54  # its own, from the 40-step run
        assert again[0]["steps"] == 80 and again[0]["steps_run"] == [28, 80]
        assert any("its 40-step run stopped at step 28, after the cool-down of its plateau at 20" in line
                   for line in lines)


def _skewed_task() -> TaskData:
    """:func:`toy_task` with a validation split 75% ``positive``: ``--metric auto`` selects by macro-F1 there."""
    data = toy_task()
    valid = data.splits["validation"]
    data.splits["validation"] = ([ex for ex in valid if ex.label == "positive"][:6]
                                 + [ex for ex in valid if ex.label == "negative"][:2])
    return data


def _recording_runner(jobs: list):
    def runner(j):
        jobs.append((j.spec.label, j.seed, j.metric))
        return _fake_seed_run(j)
    return runner


def test_every_row_ranks_by_one_metric_resolved_once_for_the_comparison(tmp_path, monkeypatch):
    """``auto`` was resolved by each run on its own: rows of one comparison could rank by different metrics,
    and runs of one row too (see the next test)."""
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: _skewed_task())
    jobs = []
    settings = CompareSettings("m", steps=6, seeds=2, lr_search=True, lr_grid=2, lr_extend=0, eval_every=2)
    rows = run_compare([Spec("a", "prompt_tuning"), Spec("b", "lora")], settings, tmp_path / "skewed",
                       log=lambda s: None, runner=_recording_runner(jobs))
    assert len(jobs) == 8 and {m for *_, m in jobs} == {"macro_f1"}
    assert [r["metric"] for r in rows] == ["macro_f1", "macro_f1"] and rows[0]["lr_search"]["metric"] == "macro_f1"
    assert json.loads((tmp_path / "skewed" / "compare.json").read_text())["settings"]["metric"] == "macro_f1"
    jobs.clear()  # asked for: kept
    run_compare([Spec("a", "prompt_tuning")], CompareSettings("m", steps=6, seeds=2, lr_search=False,
                                                              eval_every=2, metric="accuracy"),
                tmp_path / "asked", log=lambda s: None, runner=_recording_runner(jobs))
    assert {m for *_, m in jobs} == {"accuracy"}
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: toy_task())  # validation half and half
    jobs.clear()
    run_compare([Spec("a", "prompt_tuning")], CompareSettings("m", steps=6, seeds=2, lr_search=False, eval_every=2),
                tmp_path / "balanced", log=lambda s: None, runner=_recording_runner(jobs))
    assert {m for *_, m in jobs} == {"accuracy"}


def test_a_journalled_run_of_another_metric_runs_again_and_an_older_file_reads_as_accuracy(tmp_path, monkeypatch):
    """A comparison resumed across ``--metric auto``'s change to macro-F1 took its seeds 0 and 1 (accuracy
    curves) from the journal and ran seed 2 with a macro-F1 curve: the row's mean curve raised KeyError
    'accuracy' and the whole comparison stopped."""
    from softprompt.compare.journal import JOURNAL

    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: _skewed_task())
    jobs = []
    accuracy = CompareSettings("m", steps=6, seeds=3, lr_search=False, eval_every=2, metric="accuracy")
    run_compare([Spec("a", "prompt_tuning")], accuracy, tmp_path, log=lambda s: None, runner=_recording_runner(jobs))
    journal = tmp_path / JOURNAL
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    run = lines[2]["run"]  # seed 2, as auto ran it after the change
    run.update(metric="macro_f1", curve=[{"step": p["step"], "loss": p["loss"], "macro_f1": 0.6} for p in run["curve"]])
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "compare.json").unlink()
    jobs.clear()
    log = []
    row, = run_compare([Spec("a", "prompt_tuning")], accuracy, tmp_path, log=log.append,
                       runner=_recording_runner(jobs), resume=True)
    assert jobs == [("a", 2, "accuracy")] and row["metric"] == "accuracy"  # seeds 0 and 1 kept
    assert any("journalled with a validation macro_f1 curve, this comparison's metric is accuracy: run again" in line
               for line in log)
    assert all("accuracy" in p for p in row["curve"])
    # under auto (macro-F1 on this split), runs journalled when a curve held only its run's metric run again
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    for line in lines:
        line["run"].pop("macro_f1", None)
        line["run"]["curve"] = [{k: v for k, v in p.items() if k != "macro_f1"} for p in line["run"]["curve"]]
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "compare.json").unlink()
    jobs.clear()
    row, = run_compare([Spec("a", "prompt_tuning")], CompareSettings("m", steps=6, seeds=3, lr_search=False,
                                                                     eval_every=2), tmp_path, log=lambda s: None,
                       runner=_recording_runner(jobs), resume=True)
    assert jobs == [("a", s, "macro_f1") for s in range(3)] and row["metric"] == "macro_f1"
    # a compare.json written before --metric ranked by accuracy (auto then): kept under accuracy, not macro-F1
    data = json.loads((tmp_path / "compare.json").read_text())
    del data["settings"]["metric"]
    (tmp_path / "compare.json").write_text(json.dumps(data))
    assert resume_problem(tmp_path, accuracy) is None
    del data["settings"]["lr_extend"]  # and before --lr-extend: the grid only
    (tmp_path / "compare.json").write_text(json.dumps(data))
    assert resume_problem(tmp_path, replace(accuracy, lr_extend=0)) is None
    assert "lr_extend (0 there, 2 now)" in resume_problem(tmp_path, accuracy)
    resolved = CompareSettings("m", steps=6, seeds=3, lr_search=False, eval_every=2, metric="macro_f1")
    assert "metric ('accuracy' there, 'macro_f1' now)" in resume_problem(tmp_path, resolved)



def test_a_journalled_run_recording_every_metric_serves_a_comparison_ranked_by_either(tmp_path, monkeypatch):
    """A curve held only its run's metric: a comparison resumed under another ran its journalled runs again
    (about 40 CPU minutes of the README's Rotten Tomatoes comparison, for the curves alone)."""
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: _skewed_task())
    jobs = []

    def runner(j):  # as run_one records now: both metrics at every point, test macro-F1 beside accuracy
        jobs.append((j.spec.label, j.seed, j.metric))
        run = {**_fake_seed_run(replace(j, seed=j.seed % 3)), "seed": j.seed}  # (the search's seed is 3)
        run["curve"] = [{"step": p["step"], "loss": p["loss"], "accuracy": 0.5 + 0.01 * p["step"],
                         "macro_f1": 0.3 + 0.02 * p["step"]} for p in run["curve"]]
        return run

    accuracy = CompareSettings("m", steps=6, seeds=3, lr_search=True, lr_grid=2, lr_extend=0, eval_every=2,
                               metric="accuracy")
    row, = run_compare([Spec("a", "prompt_tuning")], accuracy, tmp_path, log=lambda s: None, runner=runner)
    assert len(jobs) == 5 and row["metric"] == "accuracy" and "macro_f1" not in row
    assert [p["accuracy"] for p in row["curve"]] == pytest.approx([0.52, 0.54, 0.56])
    (tmp_path / "compare.json").unlink()
    jobs.clear()
    log = []  # under auto (macro-F1 on this split): every run from the journal, ranked and reported by macro-F1
    row, = run_compare([Spec("a", "prompt_tuning")], replace(accuracy, metric="auto"), tmp_path, log=log.append,
                       runner=runner, resume=True)
    assert jobs == [] and sum("kept from" in line for line in log) == 5
    assert row["metric"] == "macro_f1" and row["lr_search"]["metric"] == "macro_f1"
    assert {s["metric"] for s in row["seeds"]} == {"macro_f1"}
    assert all("val_macro_f1" in c for c in row["lr_search"]["candidates"])
    assert [p["macro_f1"] for p in row["curve"]] == pytest.approx([0.34, 0.38, 0.42])
    assert row["macro_f1"] == pytest.approx(0.65) and "(macro-F1 0.6500" in format_row(row)

def test_compare_refuses_a_metric_the_task_does_not_measure(tmp_path, capsys):
    assert main(["compare", "--metric", "bleu", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--metric must be one of auto, accuracy, macro_f1, exact_match, f1, loss, got 'bleu'" in \
        capsys.readouterr().err
    assert main(["compare", "--metric", "exact_match", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--metric exact_match is not measured on a classification task" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_failed_run_is_not_journalled_and_runs_again_on_resume(tmp_path):
    calls = []

    def runner(j):
        calls.append(j.seed)
        if j.seed == 1 and calls.count(1) == 1:
            return {"error": "RuntimeError: out of memory"}
        return _fake_seed_run(j)

    settings = CompareSettings("m", steps=6, seeds=2, lr_search=False, eval_every=2)
    row, = run_compare([Spec("a", "prompt_tuning")], settings, tmp_path, log=lambda s: None, runner=runner)
    assert "error" in row and calls == [0, 1]
    row, = run_compare([Spec("a", "prompt_tuning")], settings, tmp_path, log=lambda s: None, runner=runner,
                       resume=True)
    assert "error" not in row and calls == [0, 1, 1]


def test_compare_resume_refuses_other_settings_and_a_store(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    settings = CompareSettings("smollm2-135m-instruct", steps=8)
    (tmp_path / "o" / "compare.json").write_text(json.dumps({"settings": settings.to_dict(), "rows": []}))
    assert main(["compare", "--resume", "--output-dir", str(tmp_path / "o")]) == 2
    assert "steps (8 there, 400 now)" in capsys.readouterr().err
    assert main(["compare", "--resume", "--steps", "8", "--store", str(tmp_path / "s"),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "--resume and --store cannot be combined" in capsys.readouterr().err
    # a file written before --schedule existed trained with the linear schedule, as --schedule linear does now
    old = {k: v for k, v in settings.to_dict().items() if k != "schedule"}
    (tmp_path / "o" / "compare.json").write_text(json.dumps({"settings": old, "rows": []}))
    assert resume_problem(tmp_path / "o", CompareSettings("smollm2-135m-instruct", steps=8, schedule="linear")) is None
    assert "schedule ('linear' there, 'wsd' now)" in resume_problem(tmp_path / "o", settings)
    for bad in ("[1, 2]", "{not json", '{"settings": [], "rows": []}'):
        (tmp_path / "o" / "compare.json").write_text(bad)
        assert main(["compare", "--resume", "--output-dir", str(tmp_path / "o")]) == 2
        assert "--resume: cannot read" in capsys.readouterr().err


def _errors(err: str) -> list[str]:
    """The command's error report (the runs made in this process also write progress bars to stderr)."""
    lines = err.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("softprompt compare: error")):]


def _fail_bitfit(monkeypatch):
    """Runs in this process; every BitFit run fails as a child would report it."""
    import softprompt.compare.harness

    def runner(j):
        if j.spec.kind == "bitfit":
            return {"method": j.spec.label, "kind": "bitfit", "error": "RuntimeError: out of luck"}
        return run_one(j)

    monkeypatch.setattr(softprompt.compare.harness, "run_in_subprocess", runner)


def test_compare_command_keep_going_writes_table_json_and_chart_and_fails(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    _fail_bitfit(monkeypatch)
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", str(tiny_model_dir), "--dataset", "capitals", "--steps", "2", "--batch-size",
               "4", "--test-samples", "4", "--val-samples", "4", "--seeds", "1", "--no-lr-search", "--only",
               "prompt_tuning,bitfit,adapter", "--output-dir", str(out), "--keep-going"])
    assert rc == 1  # BitFit failed: the table lacks a method
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert len(rows) == 7  # five prompt-tuning variants, the adapter and BitFit
    assert rows[5]["method"] == "Houlsby adapter, bottleneck 8" and "error" in rows[-1]
    assert all("accuracy" in r and r["lr_search"] is None for r in rows[:6])
    assert (out / "compare.png").stat().st_size > 0 and "| method |" in (out / "compare.md").read_text()
    captured = capsys.readouterr()
    assert "trainable params" in captured.out
    assert _errors(captured.err) == ["softprompt compare: error: 1 of 7 methods failed:",
                                         "  BitFit: RuntimeError: out of luck"]
    assert main(["compare", "--only", "dropout"]) == 2


def test_a_mistyped_dataset_is_refused_before_any_run(tmp_path, capsys):
    # it failed every method's run, each after loading the model, and the command exited 1
    assert main(["compare", "--dataset", "rotten_tomatos", "--output-dir", str(tmp_path / "typo")]) == 2
    assert "--dataset 'rotten_tomatos' is not a built-in dataset; known: rotten_tomatoes" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_compare_command_stops_at_the_first_failed_method(tiny_model_dir, tmp_path, capsys, monkeypatch):
    _fail_bitfit(monkeypatch)
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", str(tiny_model_dir), "--dataset", "capitals", "--steps", "1",
               "--batch-size", "2", "--test-samples", "2", "--only", "bitfit,full", "--output-dir", str(out)])
    assert rc == 1
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["BitFit"] and "out of luck" in rows[0]["error"]
    assert "every lr candidate failed" in rows[0]["error"] and "| BitFit |" in (out / "compare.md").read_text()
    assert _errors(capsys.readouterr().err) == [
        "softprompt compare: error: 1 of 2 methods failed:",
        "  BitFit: every lr candidate failed; the last: RuntimeError: out of luck",
        "  not run (the first failure stops the comparison; --keep-going runs them): full fine-tuning"]


def test_compare_help_documents_exit_status_keep_going_and_search(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--keep-going" in text and "exit status: 0 when every method ran; 1 when a method failed" in text
    for name in ("--seeds", "--lr-grid", "--search-steps", "--no-lr-search", "--adapter-size", "--converged-tol"):
        assert name in text


def test_only_selects_rows_by_kind_or_by_slug_in_the_default_order():
    specs, problems = select_specs("prompt-tuning-text-init-p-5, p_tuning,houlsby-adapter-bottleneck-4", 4)
    assert problems == []
    assert [s.label for s in specs] == ["prompt tuning, text init, P=5", "P-tuning (MLP), P=20",
                                        "Houlsby adapter, bottleneck 4"]
    assert [method_slug(s.label) for s in select_specs("prompt_tuning")[0]] == [
        "prompt-tuning-random-init-p-20", "prompt-tuning-sampled-vocab-p-20", "prompt-tuning-text-init-p-5",
        "prompt-tuning-text-init-p-20", "prompt-tuning-text-init-p-50"]
    specs, problems = select_specs("houlsby-adapter-bottleneck-8,prompt-tuning-text-init-p-7", 4)
    assert specs == [] and problems[0].startswith(
        "--only: unknown ['houlsby-adapter-bottleneck-8', 'prompt-tuning-text-init-p-7']; known kinds:")
    assert "houlsby-adapter-bottleneck-4" in problems[0]


def test_compare_refuses_bad_settings_together(tmp_path, capsys):
    assert main(["compare", "--seeds", "0", "--lr-grid", "0", "--search-steps", "-1", "--converged-tol", "2",
                 "--adapter-size", "0", "--only", "adapter,nope", "--schedule", "step", "--lr-extend", "-1",
                 "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    for needle in ("--seeds must be >= 1", "--lr-grid must be >= 1", "--search-steps must be >= 0",
                   "--lr-extend must be >= 0",
                   "--converged-tol must be in (0, 1)", "--adapter-size must be >= 1", "--only: unknown ['nope']",
                   "--schedule must be one of linear, cosine, constant, wsd, got 'step'"):
        assert needle in err


@pytest.mark.parametrize(("kind", "guarded"), [("prompt_tuning", True), ("lora", True), ("adapter", True),
                                               ("full", False)])
def test_compare_runs_the_divergence_guard_except_for_full_fine_tuning(tiny_model_dir, toy, kind, guarded,
                                                                        monkeypatch):
    import softprompt.train

    seen = []

    def fake_train(model, tok, method, task, args, **kwargs):
        seen.append(args.divergence_guard)
        raise RuntimeError("stop here")

    monkeypatch.setattr(softprompt.train, "train", fake_train)
    cfg = {"prompt_tuning": {"num_virtual_tokens": 3, "init": "random"}, "lora": {"r": 2}}.get(kind, {})
    with pytest.raises(RuntimeError, match="stop here"):
        run_one(job(tiny_model_dir, kind, cfg, 1e-2))
    assert seen == [guarded]


def test_a_sampled_vocab_row_draws_from_the_training_datas_tokens_as_train_does(tiny_model_dir, toy, monkeypatch):
    import softprompt.methods

    seen, real = [], softprompt.methods.build_method

    def spy(kind, config, model, tok, **kwargs):
        seen.append(kwargs)
        return real(kind, config, model, tok, **kwargs)

    monkeypatch.setattr(softprompt.methods, "build_method", spy)
    run_one(job(tiny_model_dir, "prompt_tuning", {"num_virtual_tokens": 3, "init": "sample_vocab",
                                                  "vocab_sample_size": 5}, 1e-2, steps=1))
    counts = seen[0]["token_counts"]  # without them the init fell back to the first token ids of the vocabulary
    assert counts and counts == token_counts(make_tokenizer(), toy.examples("train"))
    assert seen[0]["label_texts"] == toy.format.label_texts


def test_a_prompt_row_without_an_ensemble_is_not_called_a_method_without_a_prompt():
    """A --store run resumed without --store: the new prompt rows have no ensemble cell, and said '(no prompt)'."""
    from softprompt.compare.report import format_table

    weight = {**_fake_seed_run(Job(Spec("lora", "lora"), "m", "d", 6, 8, 0.1)), "kind": "lora", "method": "LoRA",
              "n_seeds": 1, "lr_search": None, "rollbacks": 0, "steps_run": [6], "seeds": []}
    prompt = {**weight, "kind": "prompt_tuning", "method": "pt"}
    stored = {**prompt, "method": "stored", "ensemble": {}, "ensemble_accuracy": 0.9, "ensemble_gain": 0.1}
    md = format_table([stored, prompt, weight]).splitlines()
    assert md[3].endswith("| - (run without --store) | - |") and md[4].endswith("| - (no prompt) | - |")


def test_every_run_loads_the_model_in_fp32_and_a_killed_or_chatty_child_is_one_failed_run(monkeypatch):
    """On CUDA the default is bf16, where a weight method's AdamW steps round away (a norm gain of 1.0 moves in
    steps of 0.0039): BitFit and full fine-tuning barely trained. A child killed by a signal was reported with
    whatever it last logged; a non-JSON last line raised in the parent and ended the whole comparison."""
    import subprocess

    from softprompt import model as model_module
    from softprompt.compare.run import in_child

    asked = {}

    def record(*args, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(model_module, "load_base_model", record)
    spec = Spec("BitFit", "bitfit", {}, "adamw", 1e-3)
    with pytest.raises(RuntimeError, match="stop here"):
        run_one(Job(spec, "m", "rotten_tomatoes", 2, 2, 1e-3, seed=0, val_samples=2, eval_every=0, test_samples=2))
    assert asked["dtype"] == "float32"
    for rc, out, err, expected in [(-9, "", "WARNING something", "the run was killed by signal 9"),
                                   (0, '{"a": 1}\nnot json', "", "the run's last output line is not its result")]:
        monkeypatch.setattr(subprocess, "run", lambda *a, rc=rc, out=out, err=err, **k: subprocess.CompletedProcess(
            a, rc, out, err))
        assert in_child("{}")["error"].startswith(expected)


@pytest.mark.parametrize("kind", ["bitfit", "adapter", "full"])
def test_weight_rows_on_an_encoder_train_its_head_from_a_prompt_rows_init(kind):
    # the encoder's head is random and frozen at load: prompt rows trained their own, while LoRA, adapter and
    # BitFit rows trained under the random frozen one (BitFit only its bias)
    from softprompt.methods.head import ClassificationHead
    from tests.test_seq_cls import make_encoder

    model = make_encoder("distilbert")
    method = weight_method(model, Spec(kind, kind, {"size": 4} if kind == "adapter" else {}), seed=3)
    trained = dict(zip(method._names, method.params, strict=True))
    head = ClassificationHead.create(make_encoder("distilbert"), seed=3)
    for name, t in zip(head.names, head.tensors, strict=True):
        assert name in trained and trained[name].requires_grad, name
        torch.testing.assert_close(trained[name].detach(), t.detach())


def test_lora_finds_the_query_and_value_projections_of_each_family():
    # a suffix match took Phi-3's qkv_proj for a v_proj (PEFT then found no target) and the encoders' names
    # (DistilBERT's q_lin/v_lin, BERT's query/value) matched nothing: the LoRA row failed on them
    from transformers import Phi3Config, Phi3ForCausalLM

    from softprompt.compare.weights import lora_targets
    from tests.test_seq_cls import make_encoder

    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    for model, targets in [(make_model("llama"), ["q_proj", "v_proj"]), (make_model("gpt2"), ["c_attn"]),
                           (phi3, ["qkv_proj"]), (make_encoder("distilbert"), ["q_lin", "v_lin"])]:
        assert lora_targets(model, {}) == targets
        method = weight_method(model, Spec("l", "lora", {"r": 2}))
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in method.state_dict() if "lora_" in n}
        assert adapted == set(targets)
    assert lora_targets(phi3, {"target_modules": ["o_proj"]}) == ["o_proj"]
    with pytest.raises(ValueError, match="linear layers are named .*gate_up_proj.*target_modules"):
        lora_targets(_renamed(phi3), {})


def _renamed(model):
    """``model`` with its attention projections under names no family uses."""
    for layer in model.model.layers:
        layer.self_attn.add_module("fused", layer.self_attn.qkv_proj)
        del layer.self_attn.qkv_proj
    return model


faults = test_train_guard.faults  # the fixture: a NaN loss at chosen steps


def test_a_run_records_when_and_why_the_guard_rolled_back(tiny_model_dir, toy, faults):
    """A seed's row counted its rollbacks but not their steps or reasons, so a later change to the guard could not
    be checked against the table's runs."""
    faults.update({2: "nan"})
    row = run_one(job(tiny_model_dir, "prompt_tuning", {"num_virtual_tokens": 3, "init": "random"}, 1e-2, steps=4))
    assert row["rollbacks"] == 1 and [(e["step"], e["event"]) for e in row["events"]] == [(2, "rollback")]
    assert "non-finite loss" in row["events"][0]["reason"]
    faults.clear()
    quiet = run_one(job(tiny_model_dir, "prompt_tuning", {"num_virtual_tokens": 3, "init": "random"}, 1e-2, steps=2,
                        seed=1))
    assert quiet["events"] == [] and quiet["rollbacks"] == 0
