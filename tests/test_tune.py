"""``softprompt tune``: successive halving on the validation split, on the tiny model.

The tiny random model's validation accuracy sits at chance whatever the lr, so the searches here rank by
validation loss (``--metric loss``, which moves with the lr); the accuracy-then-loss ordering is checked on
its own in ``test_ranking_*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from softprompt.config import SECTIONS, ConfigError, DataArgs, EvalArgs, ModelArgs, PromptArgs, TrainArgs, flag
from softprompt.data import TaskData, TaskFormat
from softprompt.data.dataset import examples_digest
from softprompt.forward import causal
from softprompt.methods import build_method
from softprompt.store import PromptStore, load_prompt
from softprompt.train import train
from softprompt.tune import (
    RungResult,
    Trial,
    TrialSpec,
    TuneArgs,
    TuneResult,
    add_tune_arguments,
    format_table,
    learning_rates,
    lr_edge_note,
    plan_rungs,
    rank_key,
    run_tune,
    successive_halving,
    trial_specs,
    tune_args_from_namespace,
    with_validation,
)
from tests.conftest import make_model
from tests.test_train import task

PROMPT = PromptArgs(num_virtual_tokens=4, init="random", init_scale=0.1)
LRS = [1e-6, 1e-5, 0.03, 0.1]  # two that barely move the prompt, two that lower the validation loss


def base(out, **kw) -> TrainArgs:
    """Every trial's loop: 12 steps of 8 examples (adamw), ranked by validation loss."""
    return TrainArgs(**{**dict(output_dir=str(out), max_steps=12, batch_size=8, optimizer="adamw", warmup_steps=1,
                               seed=3, metric="loss"), **kw})


def search(out, tokenizer, tune: TuneArgs, data: TaskData | None = None, **train_kw):
    return successive_halving(make_model("llama"), tokenizer, data or task(64, 32), PROMPT, base(out, **train_kw),
                              tune)


class CountSteps:
    """Counts the training forward passes (one per optimizer step here: batch 8, no accumulation)."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, model, batch, prompt):
        self.calls += 1
        return self.real(model, batch, prompt)


@pytest.fixture
def steps_trained(monkeypatch) -> CountSteps:
    counter = CountSteps(causal.target_loss)
    monkeypatch.setattr(causal, "target_loss", counter)
    return counter


def by_lr(result, lr: float) -> Trial:
    return next(t for t in result.trials if t.spec.lr == lr)


def prompt_tensor(folder) -> torch.Tensor:
    return load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]


@pytest.fixture(scope="module")
def halved(tmp_path_factory, tokenizer):
    """4 lrs, eta 2, 12 steps: rungs of 3, 6 and 12 steps for 4, 2 and 1 trials; and the steps really trained."""
    out = tmp_path_factory.mktemp("halved")
    with pytest.MonkeyPatch.context() as mp:
        counter = CountSteps(causal.target_loss)
        mp.setattr(causal, "target_loss", counter)
        result = search(out, tokenizer, TuneArgs(lrs=LRS, eta=2))
    result.trained = counter.calls
    return out, result


# ----- the search ----------------------------------------------------------------------------------------

def test_halving_keeps_the_best_trials_and_gives_them_more_steps(halved):
    out, result = halved
    assert (result.plan.rungs, result.plan.keep) == ([3, 6, 12], [4, 2, 1])
    rung0 = sorted(result.trials, key=lambda t: t.rungs[0].metric)  # lower loss first
    assert {t.spec.lr for t in rung0[:2]} == {0.03, 0.1}  # the lr makes the difference at 3 steps already
    promoted = [t for t in result.trials if len(t.rungs) > 1]
    assert promoted == sorted(rung0[:2], key=lambda t: t.index)  # exactly the 2 best of rung 0 went on
    assert sorted(t.steps for t in result.trials) == [3, 3, 6, 12]
    assert [r.steps for r in result.best.rungs] == [3, 6, 12]
    assert result.best is min(promoted, key=lambda t: t.rungs[1].metric)  # and the better of those at rung 1
    assert {by_lr(result, 1e-6).steps, by_lr(result, 1e-5).steps} == {3}  # the bad lrs stopped at rung 0
    assert result.ranking[0] is result.best and result.ranking[-1].spec.lr in (1e-6, 1e-5)
    assert result.best.last.metric < by_lr(result, 1e-6).last.metric - 0.05
    assert result.steps_used == result.plan.cost == 4 * 3 + 2 * 3 + 1 * 6
    assert result.trained == 24  # promoted trials continued: a restart would train 4 * 3 + 2 * 6 + 12 = 36
    assert "not promoted after rung 0" in by_lr(result, 1e-6).note


def test_same_seed_same_search(halved, tmp_path, tokenizer):
    _, first = halved
    again = search(tmp_path, tokenizer, TuneArgs(lrs=LRS, eta=2))

    def numbers(result):
        return [(t.id, t.status, t.steps, [(r.steps, r.metric, r.val_loss) for r in t.rungs]) for t in result.trials]

    assert numbers(again) == numbers(first)
    assert torch.equal(prompt_tensor(again.best.prompt_dir), prompt_tensor(first.best.prompt_dir))


def test_promoted_trial_continues_exactly_like_an_uninterrupted_run(halved, tmp_path, tokenizer):
    """The winner trained 3 + 3 + 6 steps in three train() calls, resuming twice from its checkpoints."""
    out, result = halved
    best = result.best
    model = make_model("llama")
    method = build_method(best.spec.method, best.spec.method_config, model, tokenizer)
    train(model, tokenizer, method, TaskData(task().format, {"train": task(64, 32).examples("train")}),
          base(tmp_path, lr=best.spec.lr))
    torch.testing.assert_close(prompt_tensor(best.prompt_dir), method.embeddings.detach(), rtol=0, atol=1e-6)
    rows = [json.loads(x) for x in (best.folder / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))  # each step once: continued, not restarted
    assert [r["lr"] for r in rows] == [r["lr"] for r in straight]  # one schedule over the 12 steps
    # what the continuation is for: a prompt of 12 steps, not the 3-step one restarted
    assert best.rungs[-1].val_loss < best.rungs[0].val_loss


def test_step_budget_derives_the_horizon_and_is_never_exceeded(tmp_path, tokenizer, steps_trained):
    result = search(tmp_path, tokenizer, TuneArgs(lrs=LRS, eta=2, budget_steps=41), max_steps=0)
    # 41 steps for 4 -> 2 -> 1 trials: r0 = 41 // (4 + 2 + 2) = 5, rungs 5, 10, 20 (40 steps), 1 left over
    assert (result.plan.rungs, result.plan.keep, result.plan.cost) == ([5, 10, 21], [4, 2, 1], 41)
    assert steps_trained.calls == result.steps_used == sum(t.steps for t in result.trials) <= 41
    assert result.best.steps == 21 and result.stopped_by is None


def test_step_budget_smaller_than_the_plan_stops_promoting(tmp_path, tokenizer, steps_trained):
    # the plan of 12-step trials costs 24; 16 pays for rung 0 (12) and one promotion (3), not a second
    result = search(tmp_path, tokenizer, TuneArgs(lrs=LRS, eta=2, budget_steps=16))
    assert steps_trained.calls == result.steps_used == 15 <= 16 and result.stopped_by == "--budget-steps"
    assert sorted(t.steps for t in result.trials) == [3, 3, 3, 6]
    assert result.best.steps == 6  # the one trial that got further ranks first
    left = [t for t in result.trials if "--budget-steps spent before rung 1" in t.note]
    assert len(left) == 1 and left[0].steps == 3


def test_step_budget_that_cannot_pay_for_rung_0_is_refused(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"--budget-steps 11 does not pay for rung 0: 4 trials x 3 steps = 12"):
        search(tmp_path, tokenizer, TuneArgs(lrs=LRS, eta=2, budget_steps=11))
    assert not (tmp_path / "trials").exists()  # refused before any training


def test_time_budget_stops_starting_segments(tmp_path, tokenizer):
    result = search(tmp_path, tokenizer, TuneArgs(lrs=LRS, eta=2, budget_minutes=1e-4))  # 6 ms
    assert result.stopped_by == "--budget-minutes"
    assert [t.status for t in result.trials] == ["ok", "not_run", "not_run", "not_run"]  # the first always runs
    assert result.best is result.trials[0] and result.steps_used == 3
    # that one segment took longer than the budget: the report says so (the search stopped quietly at exit 0)
    assert any(re.fullmatch(r"--budget-minutes 0.0001 exceeded: the search took \d+\.\ds \(the first segment "
                            r"always runs.*", n) for n in result.notes), result.notes


def test_a_minutes_budget_prices_a_segment_by_its_fixed_part_and_its_steps(tmp_path, tokenizer, monkeypatch):
    """Each segment has a fixed part (building the method, encoding, checkpoints) besides its steps. The budget
    priced the next segment by the mean seconds per step of the segments so far: short rung-0 segments, mostly
    fixed part, made every later step look 30x dearer and the search stopped with minutes unspent. On a fake
    clock: 10 s fixed per segment, 0.1 s a step, 75 s in all."""
    import time as time_module

    from softprompt.tune import halving

    now = [0.0]
    monkeypatch.setattr(time_module, "perf_counter", lambda: now[0])
    real_method, real_loss = halving._Search._method, causal.target_loss

    def method(self, spec):
        now[0] += 10.0
        return real_method(self, spec)

    def loss(model, batch, prompt):
        now[0] += 0.1
        return real_loss(model, batch, prompt)

    monkeypatch.setattr(halving._Search, "_method", method)
    monkeypatch.setattr(causal, "target_loss", loss)
    result = search(tmp_path, tokenizer, TuneArgs(lrs=LRS, eta=2, budget_minutes=1.25))
    assert result.plan.rungs == [3, 6, 12]
    # rungs 0 and 1 take 6 x 10.3 = 61.8 s; the last 6 steps cost 10.6 s (72.4 <= 75), not 6 x 10.3 / 3 = 20.6
    assert sorted(t.steps for t in result.trials) == [3, 3, 6, 12] and result.stopped_by is None


class _Overflow:
    """A model that overflows once the prompt is huge: NaN loss when a prompt value exceeds 1e3.

    The tiny model normalises its inputs, so a huge lr alone never makes it diverge; a real model's
    activations do overflow. Needs ``prompt_pass="concat"`` (the raw embeddings reach the loss).
    """

    def __init__(self, real):
        self.real = real

    def __call__(self, model, batch, prompt):
        loss = self.real(model, batch, prompt)
        if isinstance(prompt, torch.Tensor) and prompt.detach().abs().max() > 1e3:
            return loss * float("nan")
        return loss


@pytest.mark.parametrize(("guard", "rollbacks", "stop"), [(True, 1, 4), (True, 2, 6), (False, 2, 2)],
                         ids=["guard-stops-mid-rung", "guard-stops-at-the-rung-end", "no-guard-nan-prompt"])
def test_diverging_trial_ranks_last_without_crashing_and_no_nan_is_saved(tmp_path, tokenizer, monkeypatch, guard,
                                                                         rollbacks, stop):
    monkeypatch.setattr(causal, "target_loss", _Overflow(causal.target_loss))
    # lr 1e4: every update takes the prompt to ~1e3+, so every second step has a NaN loss; the guard rolls back
    # `rollbacks` times and stops the run at the next one (step 4, or step 6: the last step of rung 0, where
    # the segment ends anyway); without the guard, the first NaN step is skipped and ends the trial (step 2)
    result = search(tmp_path, tokenizer, TuneArgs(lrs=[0.03, 1e4, 0.1], eta=2), prompt_pass="concat",
                    max_rollbacks=rollbacks, divergence_guard=guard)
    assert result.plan.rungs == [6, 12]
    bad = by_lr(result, 1e4)
    assert bad.status == "diverged" and result.ranking[-1] is bad and not bad.rungs and bad.steps == stop
    assert ("divergence guard stopped it at step" if guard else "a non-finite step (the guard is off) stopped it "
            "at step 2: non-finite loss") in bad.note
    assert bad.rollbacks == (rollbacks if guard else 0)  # the final "diverged" event was counted as one more
    assert result.best is not None and result.best.spec.lr in (0.03, 0.1)
    assert not bad.prompt_dir.exists()  # never saved
    saved = [t.prompt_dir for t in result.trials if t.prompt_dir.exists()]
    assert len(saved) == 2 and all(torch.isfinite(prompt_tensor(d)).all() for d in saved)
    assert result.steps_used == sum(t.steps for t in result.trials)


def test_a_trial_that_raises_fails_alone_and_progress_is_reported_after_every_segment(tmp_path, tokenizer,
                                                                                      monkeypatch):
    real = causal.target_loss

    def out_of_memory_with_8_tokens(model, batch, prompt):  # concat pass: prompt is (P, H)
        if prompt.shape[0] == 8:
            raise RuntimeError("out of memory (simulated)")
        return real(model, batch, prompt)

    monkeypatch.setattr(causal, "target_loss", out_of_memory_with_8_tokens)
    snapshots = []
    result = successive_halving(
        make_model("llama"), tokenizer, task(64, 32), PROMPT, base(tmp_path, prompt_pass="concat"),
        TuneArgs(lrs=[0.03, 0.1], search={"num_virtual_tokens": [8, 4]}, eta=2),
        progress=lambda r: snapshots.append([(t.id, t.status, t.steps) for t in r.trials]))
    failed = [t for t in result.trials if t.spec.num_virtual_tokens == 8]
    assert [t.status for t in failed] == ["failed", "failed"] and all(t.steps == 0 for t in failed)
    assert all("RuntimeError: out of memory (simulated)" in t.note for t in failed)
    assert result.ranking[-2:] == failed and result.best.spec.num_virtual_tokens == 4
    assert [t.status for t in result.trials if t.spec.num_virtual_tokens == 4] == ["ok", "ok"]
    # rungs 3, 6, 12 for 4 -> 2 -> 1 trials: 4 + 2 + 1 segments, each followed by a snapshot
    assert len(snapshots) == 7
    assert snapshots[0] == [("t00", "failed", 0), ("t01", "pending", 0), ("t02", "pending", 0),
                            ("t03", "pending", 0)]
    assert snapshots[-1] == [(t.id, t.status, t.steps) for t in result.trials]


# ----- the command: files, best prompt, store ensemble ----------------------------------------------------

def test_run_tune_writes_trials_best_prompt_and_a_top_k_ensemble_that_loads(tmp_path, tokenizer):
    from softprompt.engine import ClassifyRequest, Engine

    out, store_dir = tmp_path / "run", tmp_path / "store"
    args = {"model": ModelArgs(), "data": DataArgs(max_length=64), "prompt": PROMPT, "train": base(out),
            "eval": EvalArgs(eval_batch_size=16)}
    model = make_model("llama")
    lines: list[str] = []
    result = run_tune(args, TuneArgs(lrs=[1e-6, 0.03, 0.1], top_k=2, store=str(store_dir), task="sent"), model,
                      tokenizer, task(64, 32), echo=lines.append)
    # trials.json: every trial with its config, steps and metric per rung, status
    doc = json.loads((out / "trials.json").read_text())
    assert doc["metric"] == "loss" and doc["best"] == result.best.id and doc["plan"]["rungs"] == [4, 12]
    assert [t["id"] for t in doc["trials"]] == ["t00", "t01", "t02"]
    for t, trial in zip(doc["trials"], result.trials, strict=True):
        assert t["config"]["lr"] == trial.spec.lr and t["status"] == "ok"
        assert [(r["rung"], r["steps"]) for r in t["rungs"]] == [(r.rung, r.steps) for r in trial.rungs]
        assert all(math.isfinite(r["metric"]) and r["metrics"]["loss"] == r["val_loss"] for r in t["rungs"])
    table = (out / "trials.md").read_text().splitlines()
    assert table[0].startswith("| rank | trial |") and "loss @4 |" in table[0] and "loss @12 (kept state) |" in table[0]
    assert len([ln for ln in table if ln.startswith("| ") and ln[2].isdigit()]) == 3
    assert (out / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the best prompt and the top 2
    best = load_prompt(out / "best_prompt", model)
    assert torch.equal(best.tensors["prompt_embeddings"], prompt_tensor(result.best.prompt_dir))
    assert best.meta["metrics"]["tune"] == {"trial": result.best.id, "rank": 1}
    assert best.meta["train_config"]["train"]["lr"] == result.best.spec.lr
    second = result.ranking[1]
    assert torch.equal(prompt_tensor(out / "top" / "2"), prompt_tensor(second.prompt_dir))
    # the store: sent-1, sent-2 and the ensemble sent over them, served by the engine
    store = PromptStore(store_dir)
    assert sorted(store.names()) == ["sent", "sent-1", "sent-2"]
    assert store.kind("sent") == "ensemble" and store.ensemble("sent").members == ["sent-1", "sent-2"]
    engine = Engine(model, tokenizer)
    engine.load_from_store(store, "sent")
    answers = engine.classify([ClassifyRequest("sent", "the movie was very good")])
    assert answers[0].label in ("positive", "negative") and sum(answers[0].votes.values()) == 2  # both members
    assert any("ensemble 'sent'" in ln for ln in lines) and any(ln.startswith("best: ") for ln in lines)
    assert json.loads((out / "tune.json").read_text())["tune"]["top_k"] == 2

    # the store entry 'sent' is now an ensemble: a top-1 search, which writes a prompt there, is refused up front
    with pytest.raises(ConfigError, match="'sent' is an ensemble, tune writes a prompt there"):
        run_tune(args, TuneArgs(lrs=[0.1], store=str(store_dir), task="sent"), model, tokenizer, task(64, 32),
                 echo=lines.append)
    assert (out / "trials" / "t02").is_dir()  # nothing was touched


def test_the_winner_is_compared_per_example_with_the_untuned_run_where_it_was_picked_and_where_not(tmp_path,
                                                                                                   tokenizer):
    """--lr 1e-6 (the untuned run) barely moves its prompt; the winner is scored again against it from both kept
    prompts, on the 32 validation examples the search ranked on (the accuracies the search measured, paired)
    and on 24 validation examples it did not read."""
    from softprompt.tune.versus import versus_untuned

    out = tmp_path / "run"
    args = {"model": ModelArgs(), "data": DataArgs(max_length=64), "prompt": PROMPT, "eval": EvalArgs(),
            "train": base(out, lr=1e-6)}
    model = make_model("llama")
    lines: list[str] = []
    unread = task(64, 56).splits["validation"][32:]  # other examples of the same toy task
    result = run_tune(args, TuneArgs(lrs=[1e-6, 0.1], eta=2), model, tokenizer, task(64, 32), echo=lines.append,
                      unread_validation=unread)
    untuned = by_lr(result, 1e-6)
    assert result.untuned is untuned and result.best is by_lr(result, 0.1)
    doc = json.loads((out / "trials.json").read_text())["versus_untuned"]
    assert (doc["winner"], doc["untuned"]) == (result.best.id, untuned.id)
    on, off = doc["selected_on"], doc["not_read"]
    assert (on["n"], off["n"]) == (32, 24)
    assert on["winner_metrics"]["accuracy"] == pytest.approx(result.best.last.metrics["accuracy"], abs=1e-9)
    assert on["untuned_metrics"]["accuracy"] == pytest.approx(untuned.last.metrics["accuracy"], abs=1e-9)
    assert on["untuned_metrics"]["macro_f1"] == pytest.approx(untuned.last.metrics["macro_f1"], abs=1e-9)
    for part, n in ((on, 32), (off, 24)):
        gained = part["winner_metrics"]["accuracy"] - part["untuned_metrics"]["accuracy"]
        assert part["only_winner_right"] - part["only_untuned_right"] == round(gained * n)
    line = next(ln for ln in (out / "trials.md").read_text().splitlines() if "against the untuned run" in ln)
    assert line.startswith(f"{result.best.id} against the untuned run ({untuned.id}, lr 1e-06): on the 32 ")
    assert "; on 24 validation examples the search did not read, accuracy " in line
    verdict = "ahead beyond chance on examples it was not" if off["beyond_chance"] else "not ahead beyond chance"
    assert verdict in line and any(line in ln for ln in lines)  # printed too
    # without unread examples: the verdict comes from those it was selected on, and says it is optimistic
    alone = versus_untuned(result, model, tokenizer, task(64, 32).splits["validation"], task(64, 32).format, 8, 64)
    assert alone["selected_on"] == on and alone["not_read"] is None
    # a task that is not label classification is not compared, and says so
    generation = TaskFormat("Q: {q}\nA:", "a")
    assert "skipped" in versus_untuned(result, model, tokenizer, [], generation, 8, 64)
    result.untuned = result.best  # the untuned run won: nothing to compare
    assert versus_untuned(result, model, tokenizer, [], generation, 8, 64) is None


def test_a_comparison_with_the_untuned_run_that_fails_is_said_and_the_search_stands(tmp_path, tokenizer,
                                                                                    monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("softprompt.tune.versus._predictions", boom)
    out = tmp_path / "run"
    args = {"model": ModelArgs(), "data": DataArgs(max_length=64), "prompt": PROMPT, "eval": EvalArgs(),
            "train": base(out, lr=1e-6, max_steps=4)}
    lines: list[str] = []
    result = run_tune(args, TuneArgs(lrs=[1e-6, 0.1], eta=2), make_model("llama"), tokenizer, task(64, 32),
                      echo=lines.append)
    assert result.best is by_lr(result, 0.1) and (out / "best_prompt" / "adapter_model.safetensors").is_file()
    doc = json.loads((out / "trials.json").read_text())
    assert doc["versus_untuned"] == {"skipped": "RuntimeError: out of memory"} and doc["best"] == result.best.id
    assert any("the winner against the untuned run: not compared (RuntimeError: out of memory)" in ln for ln in lines)


def test_the_verdict_tests_the_metric_the_search_ranked_by():
    """The untuned prompt answers x everywhere (150 x, 50 y: accuracy 0.75); the winner gets 120 x and 30 y right
    (accuracy 0.75 too, macro-F1 far higher): ahead by macro-F1, not by accuracy."""
    from types import SimpleNamespace

    from softprompt.tune.versus import compare_part

    expected = ["x"] * 150 + ["y"] * 50
    untuned = [SimpleNamespace(expected=e, predicted="x") for e in expected]
    winner = [SimpleNamespace(expected=e, predicted=e if (i < 120 or i >= 170) else ("y" if e == "x" else "x"))
              for i, e in enumerate(expected)]
    by_f1, by_accuracy = compare_part(untuned, winner, ["x", "y"], "macro_f1"), compare_part(untuned, winner,
                                                                                             ["x", "y"], "accuracy")
    assert by_f1["winner_metrics"]["accuracy"] == by_f1["untuned_metrics"]["accuracy"] == 0.75
    assert by_f1["beyond_chance"] and not by_accuracy["beyond_chance"]
    assert not compare_part(untuned, winner, ["x", "y"], "loss")["beyond_chance"]  # the loss: by accuracy


def test_the_unread_validation_examples_are_those_past_the_cap_the_search_ranks_on(tmp_path):
    from softprompt.workflows.loading import load_task_from_args
    from softprompt.workflows.tuning import unread_validation
    from tests.conftest import sentiment_records, write_jsonl

    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", sentiment_records(n, seed=i))
             for i, (split, n) in enumerate((("train", 16), ("validation", 20)))}
    data = DataArgs(train_file=str(files["train"]), validation_file=str(files["validation"]),
                    template="Review: {text}\nSentiment:", target_field="label",
                    verbalizer="positive=positive,negative=negative", max_validation_samples=8)
    loaded = load_task_from_args(data)
    unread = unread_validation(data, loaded)
    read = {(ex.source, ex.target) for ex in loaded.splits["validation"]}
    assert len(loaded.splits["validation"]) == 8 and len(unread) == 12
    assert not read & {(ex.source, ex.target) for ex in unread}
    assert unread_validation(dataclasses.replace(data, max_validation_samples=0), loaded) == []  # all read


def test_a_search_where_every_trial_diverges_saves_nothing_and_leaves_no_older_prompt(tmp_path, tokenizer,
                                                                                       monkeypatch):
    out = tmp_path / "run"
    args = {"model": ModelArgs(), "data": DataArgs(max_length=64), "prompt": PROMPT, "eval": EvalArgs(),
            "train": base(out, max_steps=6, prompt_pass="concat", max_rollbacks=1, warmup_steps=2)}
    model, lines = make_model("llama"), []
    first = run_tune(args, TuneArgs(lrs=[0.03, 0.1, 0.3], top_k=2), model, tokenizer, task(64, 32), echo=id)
    assert first.best is not None and (out / "best_prompt").is_dir() and (out / "top" / "2").is_dir()
    assert any("rung 0 ends at step 2, within --warmup-steps 2" in n for n in first.notes)  # 6 // 3 = 2
    assert "- rung 0 ends at step 2" in (out / "trials.md").read_text()
    monkeypatch.setattr(causal, "target_loss", _Overflow(causal.target_loss))
    result = run_tune(args, TuneArgs(lrs=[1e4]), model, tokenizer, task(64, 32), echo=lines.append)
    assert result.best is None and [t.status for t in result.trials] == ["diverged"]
    assert not (out / "best_prompt").exists() and not (out / "top" / "1").exists()  # the first search's: gone
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["t00"]  # its trials too
    assert json.loads((out / "trials.json").read_text())["best"] is None
    assert any("every trial diverged" in ln for ln in lines)


def test_a_search_killed_before_its_first_report_leaves_no_report_of_the_earlier_one(tmp_path, tokenizer,
                                                                                      monkeypatch):
    """The earlier search's trials.json/.md/.png stayed beside the new tune.json (their best prompt was gone)."""
    out = tmp_path / "run"
    args = {"model": ModelArgs(), "data": DataArgs(max_length=64), "prompt": PROMPT, "eval": EvalArgs(),
            "train": base(out, max_steps=2)}
    model = make_model("llama")
    run_tune(args, TuneArgs(lrs=[0.1]), model, tokenizer, task(32, 8), echo=id)
    assert {"trials.json", "trials.md", "trials.png", "tune.json"} <= {p.name for p in out.iterdir()}

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(causal, "target_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        run_tune(args, TuneArgs(lrs=[0.03]), model, tokenizer, task(32, 8), echo=id)
    assert json.loads((out / "tune.json").read_text())["tune"]["lrs"] == [0.03]  # the new search's
    assert not {"trials.json", "trials.md", "trials.png", "best_prompt"} & {p.name for p in out.iterdir()}


def test_ensemble_seeds_past_the_largest_seed_are_refused_before_the_search(tmp_path, tokenizer):
    # seeds --seed .. --seed + n - 1: replace() re-checked them only when the winner was retrained, after the
    # whole search, and the ConfigError lost every result
    from softprompt.config import MAX_SEED

    args = {"model": ModelArgs(), "data": DataArgs(max_length=64), "prompt": PROMPT, "eval": EvalArgs(),
            "train": base(tmp_path / "run", seed=MAX_SEED - 1)}
    with pytest.raises(ConfigError, match=f"--ensemble-seeds 3 trains seeds {MAX_SEED - 1} to {MAX_SEED + 1}, past"):
        run_tune(args, TuneArgs(lrs=[0.1], ensemble_seeds=3), make_model("llama"), tokenizer, task(64, 32),
                 echo=id)
    assert not (tmp_path / "run" / "trials").exists()


def test_a_refused_search_leaves_the_earlier_one_whole_and_top_k_on_a_generation_task_stores_the_best(
        tmp_path, tokenizer):
    """A search refused by its own checks (--top-k over the trial count, a budget that cannot pay rung 0) had
    already deleted the earlier search's best_prompt/ and top/ and rewritten tune.json; --top-k 2 --store on a
    generation task saved top-1..2 in the store, then failed at the ensemble after the whole search."""
    from softprompt.data import TaskFormat
    from tests.conftest import sentiment_records
    from tests.test_train import FMT

    gen = TaskFormat(FMT.template, FMT.target_field)
    recs = sentiment_records(40, seed=1)
    data = TaskData(gen, {"train": [gen.render(r) for r in recs[:32]],
                          "validation": [gen.render(r) for r in recs[32:]]})
    out, store_dir, lines = tmp_path / "run", tmp_path / "store", []
    args = {"model": ModelArgs(), "data": DataArgs(max_length=64), "prompt": PROMPT, "eval": EvalArgs(),
            "train": base(out, max_steps=4)}
    model = make_model("llama")
    first = run_tune(args, TuneArgs(lrs=[0.03, 0.1], top_k=2, store=str(store_dir), task="gen"), model, tokenizer,
                     data, echo=lines.append)
    assert first.best is not None and (out / "top" / "2").is_dir()
    store = PromptStore(store_dir)
    assert store.names() == ["gen"] and store.kind("gen") == "prompt"
    assert torch.equal(load_prompt(store.path("gen"), model).tensors["prompt_embeddings"],
                       prompt_tensor(first.best.prompt_dir))
    assert any("--top-k 2 --store: no ensemble is built: this is a generation task" in ln for ln in lines)
    before = (out / "tune.json").read_text()
    best = prompt_tensor(out / "best_prompt")
    with pytest.raises(ConfigError, match="--top-k 5 is more than the 1 trials"):
        run_tune(args, TuneArgs(lrs=[0.3], top_k=5), model, tokenizer, data, echo=lines.append)
    assert torch.equal(prompt_tensor(out / "best_prompt"), best) and (out / "top" / "2").is_dir()
    assert (out / "tune.json").read_text() == before and (out / "trials" / "t01").is_dir()


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_data_no_trial_can_encode_is_refused_before_the_earlier_search_is_touched(tmp_path, tokenizer):
    """train() checks the validation split only when it has it, and tune hands it the training split alone: a
    validation target over --max-length (or a training one, the run length from --max-steps) raised in the
    first trial's segment, after the earlier search's best_prompt/ had been deleted, and tune exited 2 as if
    the search had been refused."""
    from softprompt.data import DataError, TaskFormat
    from tests.conftest import sentiment_records
    from tests.test_train import FMT

    gen = TaskFormat(FMT.template, FMT.target_field)
    recs = sentiment_records(40, seed=1)
    data = TaskData(gen, {"train": [gen.render(r) for r in recs[:32]],
                          "validation": [gen.render(r) for r in recs[32:]]})
    out = tmp_path / "run"
    args = {"model": ModelArgs(), "data": DataArgs(max_length=16), "prompt": PROMPT, "eval": EvalArgs(),
            "train": base(out, max_steps=2)}
    model = make_model("llama")
    assert run_tune(args, TuneArgs(lrs=[0.1]), model, tokenizer, data, echo=id).best is not None
    before = _files(out)
    long = gen.render({"text": "a", "label": " ".join(["good"] * 20)})
    for split in ("validation", "train"):
        splits = {**data.splits, split: [long] + data.splits[split]}
        with pytest.raises(DataError, match=f"^{split} split: example 0: target"):
            run_tune(args, TuneArgs(lrs=[0.03, 0.1]), model, tokenizer, TaskData(gen, splits), echo=id)
        assert _files(out) == before


# ----- the validation split -------------------------------------------------------------------------------

def test_a_task_without_validation_is_refused_or_split_deterministically_on_request(tmp_path, tokenizer):
    full = task(40, 8)
    test_split = full.examples("validation")  # stands for a test split: must stay as it is
    no_val = TaskData(full.format, {"train": full.examples("train"), "test": test_split})
    with pytest.raises(ConfigError, match="--validation-file FILE, or --validation-from-train"):
        with_validation(no_val, TuneArgs(), seed=13)
    with pytest.raises(ConfigError, match="validation split and the task has none"):
        search(tmp_path, tokenizer, TuneArgs(lrs=[0.1]), data=no_val)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="runs in one process"):
            search(tmp_path, tokenizer, TuneArgs(lrs=[0.1]))
    carved = with_validation(no_val, TuneArgs(validation_from_train=0.25), seed=13)
    again = with_validation(no_val, TuneArgs(validation_from_train=0.25), seed=13)
    other = with_validation(no_val, TuneArgs(validation_from_train=0.25), seed=14)
    assert len(carved.splits["validation"]) == 10 and len(carved.splits["train"]) == 30
    assert carved.splits == again.splits and other.splits["validation"] != carved.splits["validation"]
    train_src = [e.source for e in carved.splits["train"]]
    assert not set(train_src) & {e.source for e in carved.splits["validation"]}
    assert sorted(train_src + [e.source for e in carved.splits["validation"]]) == sorted(
        e.source for e in full.examples("train"))
    assert carved.splits["test"] is test_split
    assert with_validation(full, TuneArgs(validation_from_train=0.25), seed=13) is full  # it has one: kept


def test_eval_rebuilds_a_recorded_hold_out_and_refuses_a_malformed_record(tmp_path):
    """What eval does with a stored prompt's recorded --validation-from-train (end to end in test_cli)."""
    from softprompt.store import StoreError
    from softprompt.workflows.evaluation import apply_recorded_carve

    f = tmp_path / "train.jsonl"
    f.write_text("{}\n")  # only its name matters here: the task is given loaded
    no_val = TaskData(task(40, 8).format, {"train": task(40, 8).examples("train")})
    data = DataArgs(train_file=str(f))
    carve = {"fraction": 0.25, "data_seed": 7, "train_examples": 30, "validation_examples": 10}
    meta = {"train_config": {"data": {"train_file": str(f), "validation_from_train": carve}}}
    got = apply_recorded_carve(meta, no_val, data, "p")
    assert got.splits == with_validation(no_val, TuneArgs(validation_from_train=0.25), seed=7, echo=id).splits
    assert apply_recorded_carve(meta, no_val, DataArgs(train_file=__file__), "p") is no_val  # other data: as given
    # the data edited since with the same counts: the counts alone let the rebuilt validation split hold other
    # examples (some the prompt trained on); the recorded digest of the held-out examples catches it
    from softprompt.data import DataError

    digest = examples_digest(got.splits["validation"])
    assert digest == examples_digest(list(reversed(got.splits["validation"])))  # which examples, not their order
    signed = {"train_config": {"data": {"train_file": str(f), "validation_from_train": {**carve,
                                                                                        "validation_digest": digest}}}}
    assert apply_recorded_carve(signed, no_val, data, "p").splits == got.splits
    edited = TaskData(no_val.format, {"train": list(no_val.splits["train"])})
    i = next(i for i, ex in enumerate(edited.splits["train"]) if ex is got.splits["validation"][0])
    edited.splits["train"][i] = dataclasses.replace(edited.splits["train"][i], source="an edited review")
    with pytest.raises(DataError, match="p: softprompt tune held out 10 of the 40 training examples .* now holds "
                                        r"out other examples \(the same counts, other content\)"):
        apply_recorded_carve(signed, edited, data, "p")
    assert apply_recorded_carve(meta, edited, data, "p")  # recorded before the digest: counts only, as before
    for bad in ({**carve, "fraction": 1.5}, {**carve, "data_seed": -1}, {**carve, "train_examples": True},
                {k: v for k, v in carve.items() if k != "validation_examples"}, [0.25]):
        bad_meta = {"train_config": {"data": {"train_file": str(f), "validation_from_train": bad}}}
        with pytest.raises(StoreError, match="p: softprompt.json train_config.data.validation_from_train must be"):
            apply_recorded_carve(bad_meta, no_val, data, "p")


def test_stored_trial_prompts_record_what_they_trained_on_not_the_search_bookkeeping(tmp_path, tokenizer):
    """best_prompt/ recorded train.resume true and checkpoint_every the rungs' gcd (a segment's settings), and
    with --validation-from-train the whole training file as its data, with validation_file null."""
    full = task(40, 8)
    no_val = TaskData(full.format, {"train": full.examples("train")})
    out = tmp_path / "run"
    args = {"model": ModelArgs(), "data": DataArgs(max_length=64, data_seed=5), "prompt": PROMPT,
            "eval": EvalArgs(), "train": base(out, max_steps=4)}
    result = run_tune(args, TuneArgs(lrs=[0.03, 0.1], eta=2, validation_from_train=0.25), make_model("llama"),
                      tokenizer, no_val, echo=id)
    assert result.plan.rungs == [2, 4] and result.best.steps == 4  # resumed once, at step 2
    # two lrs tried: the winner is one of them, at an edge of the range, and the notes say so
    assert sum("the winner's lr" in n for n in result.notes) == 1
    assert "the best lr may lie" in (out / "trials.md").read_text()
    recorded = load_prompt(out / "best_prompt").meta["train_config"]
    assert recorded["train"]["resume"] is False and recorded["train"]["checkpoint_every"] == 25  # TrainArgs'
    assert recorded["train"]["max_steps"] == 4 and recorded["train"]["lr"] == result.best.spec.lr
    assert recorded["data"]["validation_from_train"] == {
        "fraction": 0.25, "data_seed": 5, "train_examples": 30, "validation_examples": 10,
        "validation_digest": examples_digest(with_validation(no_val, TuneArgs(validation_from_train=0.25), seed=5,
                                                             echo=id).splits["validation"])}
    assert json.loads((out / "tune.json").read_text())["data"]["validation_from_train"]["train_examples"] == 30


# ----- ranking, plan, space -------------------------------------------------------------------------------

def _trial(i, status="ok", rungs=()):
    t = Trial(i, TrialSpec(0.1, "prompt_tuning", 4, "random", {}), folder=None, status=status)
    t.rungs = [RungResult(k, 3 ** (k + 1), acc, loss, {}, 0.0) for k, (acc, loss) in enumerate(rungs)]
    return t


def test_ranking_by_accuracy_then_validation_loss_diverged_and_not_run_last():
    trials = [_trial(0, "diverged"), _trial(1, rungs=[(0.8, 0.5)]), _trial(2, rungs=[(0.8, 0.4)]),
              _trial(3, rungs=[(0.9, 0.9)]), _trial(4, "not_run"), _trial(5, rungs=[(0.9, 0.3), (0.7, 0.6)]),
              _trial(6, rungs=[(0.8, 0.4)])]
    order = [t.index for t in sorted(trials, key=lambda t: rank_key(t, higher=True))]
    # the highest rung reached first, then accuracy, then loss, then trial order; diverged, then never run
    assert order == [5, 3, 2, 6, 1, 0, 4]
    order = [t.index for t in sorted(trials, key=lambda t: rank_key(t, higher=False))]  # a loss-like metric
    assert order == [5, 2, 6, 1, 3, 0, 4]



def test_a_winner_at_the_edge_of_the_lrs_tried_with_its_settings_gets_a_note():
    def trial(i, lr, acc, p=4):
        t = Trial(i, TrialSpec(lr, "prompt_tuning", p, "random", {}), folder=None, status="ok")
        t.rungs = [RungResult(0, 10, acc, 1 - acc, {}, 0.0)]
        return t

    def note(*trials):
        ranking = sorted(trials, key=lambda t: rank_key(t, higher=True))
        return lr_edge_note(TuneResult(list(trials), ranking, plan_rungs(len(trials), 3, horizon=90), "accuracy",
                                       True, 0, 0.0, None))

    grid = [trial(0, 0.03, 0.6), trial(1, 0.1, 0.7), trial(2, 0.3, 0.8)]
    assert note(*grid) == ("the winner's lr 0.3 is the highest of the 3 lrs tried with its settings (0.03 to 0.3): "
                           "the best lr may lie above the range searched; search one that reaches past it "
                           "(--lr-range or --lrs)")
    assert "0.03 is the lowest of the 3 lrs" in note(trial(0, 0.03, 0.9), *grid[1:])
    assert note(grid[0], trial(1, 0.1, 0.9), grid[2]) is None  # bracketed
    assert "is the highest of the 3 lrs" in note(*grid, trial(3, 1.0, 0.5, p=8))  # another P's lrs do not bracket
    assert note(trial(0, 0.1, 0.7)) is None and note(trial(0, 0.1, 0.7), trial(1, 0.1, 0.6, p=8)) is None

def test_plan_rungs():
    plan = plan_rungs(9, 3, horizon=90)
    assert (plan.rungs, plan.keep, plan.cost) == ([10, 30, 90], [9, 3, 1], 9 * 10 + 3 * 20 + 60)
    assert plan_rungs(9, 3, horizon=100, min_steps=5).rungs == [5, 15, 100]
    assert plan_rungs(9, 3, horizon=20, min_steps=5).rungs == [5, 15, 20]
    short = plan_rungs(9, 3, horizon=8, min_steps=5)
    assert (short.rungs, short.keep) == ([5, 8], [9, 3])  # the horizon cuts the halving short
    assert plan_rungs(10, 3, horizon=90).keep == [10, 3, 1]
    assert plan_rungs(1, 3, horizon=50).rungs == [50]
    budget = plan_rungs(9, 3, horizon=None, budget_steps=100)
    assert budget.cost <= 100 and budget.keep == [9, 3, 1] and budget.rungs[:2] == [4, 12]
    fewer = plan_rungs(9, 3, horizon=None, min_steps=10, budget_steps=100)
    assert fewer.keep == [9] and fewer.cost <= 100 and fewer.rungs == [11]  # only rung 0 fits; it gets the rest
    with pytest.raises(ConfigError, match="--min-steps 50 is more than a whole trial"):
        plan_rungs(4, 2, horizon=40, min_steps=50)
    with pytest.raises(ConfigError, match="--budget-steps 8 does not pay for rung 0"):
        plan_rungs(9, 3, horizon=None, budget_steps=8)


def test_rung_0_ends_well_past_the_warmup():
    """A cut right after the warmup ranks trials that have barely trained at their own lr (issue 12: on Rotten
    Tomatoes the best lr at 100 steps read the lowest accuracy at step 11 and was cut)."""
    plan = plan_rungs(9, 3, horizon=100, warmup_steps=10)
    assert (plan.rungs, plan.keep) == ([30, 100], [9, 3])  # 30, 90, 100: the 90 merged, 3 trials finish
    assert plan_rungs(9, 3, horizon=100, warmup_steps=0).rungs == [11, 33, 100]
    assert plan_rungs(9, 3, horizon=100, min_steps=11, warmup_steps=10).rungs == [11, 33, 100]  # the user's
    assert plan_rungs(9, 3, horizon=30, warmup_steps=10).rungs == [10, 30]  # at most horizon // eta: a cut
    assert plan_rungs(9, 3, horizon=1000, warmup_steps=10).rungs == [111, 333, 1000]  # already past it
    assert plan_rungs(9, 2, horizon=100, warmup_steps=10).rungs == [30, 60, 100]  # 40 more steps: kept
    budget = plan_rungs(9, 3, horizon=None, budget_steps=600, warmup_steps=10)
    assert (budget.rungs, budget.keep) == ([30, 140], [9, 3]) and budget.cost <= 600
    small = plan_rungs(9, 3, horizon=None, budget_steps=232, warmup_steps=10)  # two rungs of 30 do not fit
    assert small.rungs == [11, 33, 100]


def test_the_search_plans_rung_0_from_the_warmup(tmp_path, tokenizer):
    result = search(tmp_path / "run", tokenizer, TuneArgs(lrs=LRS, eta=2), warmup_steps=2)
    assert (result.plan.rungs, result.plan.keep) == ([6, 12], [4, 2])  # 12 // 4 = 3 would end at warmup + 1
    assert sorted(t.steps for t in result.trials) == [6, 6, 12, 12]


def test_the_untuned_run_continues_at_every_rung_in_a_slot_of_its_own(tmp_path, tokenizer):
    """--lr 1e-6 is the worst of the four at rung 0; it still trains to the end (one more trial per later rung),
    as `softprompt train` would run it, and the search returns a better one only because it validates better."""
    lrs = [1e-6, 0.03, 0.1, 0.3]
    result = search(tmp_path / "kept", tokenizer, TuneArgs(lrs=lrs, eta=2), lr=1e-6, eval_every=3)
    untuned = by_lr(result, 1e-6)
    assert (result.plan.rungs, result.plan.keep, result.plan.keeps_default) == ([3, 6, 12], [4, 3, 2], True)
    assert max(result.trials, key=lambda t: t.rungs[0].metric) is untuned  # the worst validation loss at rung 0
    assert untuned.steps == 12 and "untuned" in untuned.note
    assert result.steps_used == result.plan.cost == 4 * 3 + 3 * 3 + 2 * 6
    assert result.best is not untuned and result.best.last.metric < untuned.last.metric
    # its result is what `softprompt train --lr 1e-6` keeps: the same run, selected the same way
    model = make_model("llama")
    method = build_method("prompt_tuning", untuned.spec.method_config, model, tokenizer)
    straight = train(model, tokenizer, method, task(64, 32), base(tmp_path / "train", lr=1e-6, eval_every=3))
    assert untuned.last.metric == pytest.approx(straight.best_metric, abs=1e-6)
    assert untuned.last.best_step == straight.best_step
    off = search(tmp_path / "off", tokenizer, TuneArgs(lrs=lrs, eta=2, keep_default=False), lr=1e-6)
    assert off.plan.keep == [4, 2, 1] and by_lr(off, 1e-6).steps == 3
    elsewhere = search(tmp_path / "none", tokenizer, TuneArgs(lrs=lrs[1:], eta=2), lr=1e-6)  # no such trial
    assert elsewhere.plan.keep == [3, 1] and any("no trial is the untuned run" in n for n in elsewhere.notes)


def test_the_last_rung_keeps_each_trials_best_validated_state_as_train_does(tmp_path, tokenizer):
    """Ranked by accuracy (flat at chance on the tiny model: the first of equal values is kept), evaluated every
    3 steps in the last rung (6 -> 12, at 9 and 12): the state kept is step 9's, as `train` keeps it, not step
    12's. (Before the last rung only the rung ends are evaluated, by the search.)"""
    result = search(tmp_path / "run", tokenizer, TuneArgs(lrs=[0.03, 0.1], eta=2, keep_default=False),
                    metric="accuracy", eval_every=3)
    best = result.best
    assert result.plan.rungs == [6, 12] and best.steps == 12 and best.last.best_step == 9
    model = make_model("llama")
    method = build_method("prompt_tuning", best.spec.method_config, model, tokenizer)
    # a straight run evaluated where the last rung evaluates (9 and its end, 12): step 3's and 6's states tie too
    straight = train(model, tokenizer, method, task(64, 32), base(tmp_path / "train", lr=best.spec.lr,
                                                                   metric="accuracy", eval_every=9))
    assert straight.best_step == 9
    torch.testing.assert_close(prompt_tensor(best.prompt_dir), straight.best_state["embeddings"], rtol=0, atol=1e-6)
    assert not torch.allclose(prompt_tensor(best.prompt_dir), method.embeddings.detach())  # step 12's state
    assert best.last.metrics["loss"] == pytest.approx(straight.best_metrics["val_loss"], abs=1e-6)
    assert "12 (best @9)" in format_table(result)


def test_auto_ranks_by_macro_f1_where_one_label_dominates_the_validation_split(tmp_path, tokenizer):
    """As train selects: a constant answer scores 0.75 accuracy on this split, so ``--metric auto`` ranks the
    trials, and keeps each last-rung state, by macro-F1."""
    data = task(64, 32)
    valid = data.splits["validation"]
    skewed = TaskData(data.format, {"train": data.splits["train"],
                                    "validation": [ex for ex in valid if ex.label == "positive"][:12]
                                    + [ex for ex in valid if ex.label == "negative"][:4]})
    result = search(tmp_path / "run", tokenizer, TuneArgs(lrs=[0.03, 0.1], eta=2, keep_default=False), data=skewed,
                    metric="auto", max_steps=6)
    assert result.metric == "macro_f1" and result.higher_is_better
    assert all(r.metric == r.metrics["macro_f1"] for t in result.trials for r in t.rungs)
    assert "macro_f1 @3" in format_table(result)


@pytest.mark.parametrize("fields, named", [
    ({"lrs": "0.1"}, "--lrs: expected a list of numbers"), ({"lrs": [0.1, True]}, "--lrs: expected a list"),
    ({"eta": "3"}, "--eta: expected an integer"), ({"top_k": 2.5}, "--top-k: expected an integer"),
    ({"min_steps": True}, "--min-steps: expected an integer"), ({"budget_steps": "10"}, "--budget-steps: expected"),
    ({"lr_range": (1,)}, "--lr-range: expected two numbers"), ({"search": ["init"]}, "--search: expected"),
    ({"search": {"init": "text"}}, "--search: expected"), ({"keep_default": 1}, "--keep-default: expected true"),
    ({"budget_minutes": "2"}, "--budget-minutes: expected a number"), ({"task": 3}, "--task: expected text")])
def test_tune_args_of_the_wrong_type_built_in_python_name_the_flag(fields, named):
    """They were bare TypeErrors ('<' between str and int), an AttributeError, or accepted (top_k=2.5)."""
    with pytest.raises(ConfigError, match=re.escape(named)):
        TuneArgs(**fields)


def test_search_space():
    assert learning_rates(TuneArgs(), 0.3, seed=0)[6] == pytest.approx(0.3)  # the default grid holds --lr
    assert len(learning_rates(TuneArgs(), 0.3, seed=0)) == 9
    grid = learning_rates(TuneArgs(lr_range=(1e-3, 1e-1), num_trials=3), 0.3, seed=0)
    assert grid == pytest.approx([1e-3, 1e-2, 1e-1])
    draw = TuneArgs(lr_range=(1e-3, 1e-1), num_trials=5, lr_sampling="random")
    assert learning_rates(draw, 0.3, seed=1) == learning_rates(draw, 0.3, seed=1) != learning_rates(draw, 0.3, 2)
    assert all(1e-3 <= v <= 1e-1 for v in learning_rates(draw, 0.3, seed=1))
    specs, notes = trial_specs(TuneArgs(lrs=[0.1, 0.3], search={"method": ["prompt_tuning", "p_tuning",
                                                                          "prefix_tuning"],
                                                               "init": ["text", "sample_vocab"]}),
                               PromptArgs(), TrainArgs())
    kinds = [(s.method, s.init_shown, s.lr) for s in specs]
    assert kinds == [("prompt_tuning", "text", 0.1), ("prompt_tuning", "text", 0.3),
                     ("prompt_tuning", "sample_vocab", 0.1), ("prompt_tuning", "sample_vocab", 0.3),
                     ("p_tuning", "-", 0.1), ("p_tuning", "-", 0.3),
                     ("prefix_tuning", "text", 0.1), ("prefix_tuning", "text", 0.3)]
    assert any("p_tuning" in n and "same trial" in n for n in notes)
    assert any("prefix_tuning" in n and "sample_vocab" in n for n in notes)


# ----- flags ----------------------------------------------------------------------------------------------

def parse(*argv):
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    return tune_args_from_namespace(parser.parse_args(list(argv)))


def test_tune_flags_parse_and_do_not_clash_with_the_train_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    ours = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    sections = {flag(f.name) for s in ("model", "data", "prompt", "train", "eval")
                for f in dataclasses.fields(SECTIONS[s])}
    assert not ours & sections
    tune, problems = parse("--lrs", "0.01, 0.1", "--search", "num-virtual-tokens=8,16", "--search",
                           "method=prompt_tuning,p_tuning", "--budget-steps", "300", "--budget-minutes", "2.5",
                           "--eta", "2", "--min-steps", "5", "--top-k", "3", "--store", str(tmp_path / "s"),
                           "--task", "sent", "--validation-from-train", "0.1")
    assert problems == []
    assert tune == TuneArgs(lrs=[0.01, 0.1], search={"num_virtual_tokens": [8, 16],
                                                     "method": ["prompt_tuning", "p_tuning"]},
                            budget_steps=300, budget_minutes=2.5, eta=2, min_steps=5, top_k=3,
                            store=str(tmp_path / "s"), task="sent", validation_from_train=0.1)
    assert tune.max_virtual_tokens(20) == 16 and TuneArgs().max_virtual_tokens(20) == 20
    assert parse("--lr-range", "1e-3", "1", "--num-trials", "4")[0].lr_range == (1e-3, 1.0)
    assert parse()[0].keep_default is True and parse("--no-keep-default")[0].keep_default is False


def test_every_bad_tune_flag_is_reported_at_once_naming_it(tmp_path):
    (tmp_path / "file").write_text("x")
    tune, problems = parse("--lrs", "0.1,abc,-1", "--lr-range", "1", "0.1", "--num-trials", "0", "--lr-sampling",
                           "sobol", "--search", "lr=0.1", "--search", "init=text,bogus", "--search", "nope",
                           "--search", "num_virtual_tokens=8,x", "--search", "method=magic", "--budget-steps", "0",
                           "--budget-minutes", "nan", "--eta", "1", "--min-steps", "0", "--top-k", "0",
                           "--store", str(tmp_path / "file"), "--validation-from-train", "1.5")
    text = "\n".join(problems)
    assert tune is None
    for expected in ("--lrs: 'abc' is not a number", "--lr-range LOW HIGH needs LOW < HIGH",
                     "--num-trials must be >= 1", "--lr-sampling must be grid or random",
                     "--search lr: unknown key", "--lrs or --lr-range", "--search init: 'bogus'",
                     "--search 'nope': expected KEY=V1,V2", "--search num_virtual_tokens=8,x",
                     "--search method: 'magic'", "--budget-steps must be >= 1", "--budget-minutes must be a finite",
                     "--eta must be an integer >= 2", "--min-steps must be >= 1", "--top-k must be >= 1",
                     "--store and --task go together", "exists and is not a folder",
                     "--validation-from-train must be a fraction"):
        assert expected in text, expected
    assert "--lrs and --lr-range both given" in "\n".join(parse("--lrs", "0.1", "--lr-range", "0.01", "1")[1])
    assert "--lrs must be > 0" in "\n".join(parse("--lrs", "0.1,-1")[1])
    assert "--num-trials sets how many" in "\n".join(parse("--num-trials", "3")[1])
    assert "add --lr-range" in "\n".join(parse("--lr-sampling", "random")[1])
    assert "--task ../x" in "\n".join(parse("--store", str(tmp_path / "s"), "--task", "../x")[1])
    assert "given twice" in "\n".join(parse("--search", "init=text", "--search", "init=random")[1])
    assert "repeats a value" in "\n".join(parse("--lrs", "0.1,0.1")[1])


def test_resume_is_refused_before_an_earlier_search_is_touched(tmp_path, tiny_model_dir, capsys):
    from softprompt.cli import main

    out = tmp_path / "tune"
    for kept in ("trials/t00/checkpoint/state.json", "best_prompt/softprompt.json", "tune.json"):
        (out / kept).parent.mkdir(parents=True, exist_ok=True)
        (out / kept).write_text("{}")
    (tmp_path / "c.yaml").write_text("train:\n  resume: true\n")
    for extra in (["--resume"], ["--config", str(tmp_path / "c.yaml")]):
        assert main(["tune", "--model", str(tiny_model_dir), "--output-dir", str(out), *extra]) == 2
        assert "--resume: tune does not resume an interrupted search" in capsys.readouterr().err
    # flags of train that a trial would drop in silence (accepted, written into every trial's config, unused)
    assert main(["tune", "--model", str(tiny_model_dir), "--output-dir", str(out), "--stop-when-flat", "0.02",
                 "--early-stopping-patience", "3"]) == 2
    err = capsys.readouterr().err
    assert "--stop-when-flat: tune ranks trials at fixed rungs" in err and "--early-stopping-patience: tune" in err
    # and eval flags a search never reads (it scores on validation, without baselines)
    assert main(["tune", "--model", str(tiny_model_dir), "--output-dir", str(out), "--split", "validation",
                 "--baselines", "no_prompt", "--k-shot", "2"]) == 2
    err = capsys.readouterr().err
    for needle in ("--split validation: tune scores its trials", "--baselines no_prompt: tune", "--k-shot 2: tune"):
        assert needle in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "best_prompt/softprompt.json", "trials/t00/checkpoint/state.json", "tune.json"]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--lr", "1e308"], "--lr 1e+308 (the default grid, --lr/27 to --lr*3) gives the learning rate inf, not a"),
    (["--lr", "1e-323"], "--lr 1e-323 (the default grid, --lr/27 to --lr*3) gives the learning rate 0, not"),
    (["--lr-range", "1e200", "1e300", "--num-trials", "1"], "--lr-range 1e+200 1e+300 gives the learning rate inf"),
    (["--lr", "1e-322"], "--lr 1e-322 (the default grid, --lr/27 to --lr*3) gives repeated learning rates (5e-324, "
                         "5e-324, 1e-323,"),
    (["--lr-range", "1e-3", "1.0000000000000002e-3", "--num-trials", "3"],
     "--lr-range 0.001 0.0010000000000000002 gives repeated learning rates (0.001, 0.001, 0.0010000000000000002): "
     "their trials would be the same; choose a wider --lr-range or fewer --num-trials")])
def test_a_learning_rate_grid_past_the_float_range_is_refused_before_anything_runs(tmp_path, tiny_model_dir, capsys,
                                                                                   tokenizer, extra, needle):
    """A valid --lr (or --lr-range) whose grid overflows to inf or underflows to 0: each trial's TrainArgs refused
    it mid-search, after the earlier search's best_prompt/ was deleted and the first trials had run. One that
    repeats a learning rate (a subnormal --lr, a range narrower than the floats in it) ran identical trials."""
    from softprompt.cli import main
    from tests.conftest import sentiment_records, write_jsonl

    recs = sentiment_records(24, seed=1)
    out = tmp_path / "tune"
    (out / "best_prompt").mkdir(parents=True)
    (out / "best_prompt" / "softprompt.json").write_text("{}")
    argv = ["tune", "--model", tiny_model_dir, "--train-file", write_jsonl(tmp_path / "t.jsonl", recs[:16]),
            "--validation-file", write_jsonl(tmp_path / "v.jsonl", recs[16:]), "--template",
            "Review: {text} Sentiment:", "--target-field", "label", "--verbalizer",
            "positive=positive,negative=negative", "--max-steps", "2", "--batch-size", "8", "--output-dir", out, *extra]
    assert main([str(a) for a in argv]) == 2
    assert needle in capsys.readouterr().err
    assert [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()] == ["best_prompt/softprompt.json"]
    with pytest.raises(ConfigError, match=re.escape(needle)):  # the Python API refuses it as early
        ranged = {"lr_range": (float(extra[1]), float(extra[2])), "num_trials": int(extra[4])} if len(extra) > 2 else {}
        search(tmp_path / "api", tokenizer, tune=TuneArgs(**ranged), lr=float(extra[1]))


def test_epochs_the_step_budget_would_ignore_are_refused(tmp_path, tiny_model_dir, tokenizer, capsys):
    """--budget-steps without --max-steps sets the trials' length: --epochs was dropped in silence."""
    from softprompt.cli import main

    out = tmp_path / "tune"
    for epochs in ("3", "1"):  # given, even at its default
        assert main(["tune", "--model", str(tiny_model_dir), "--output-dir", str(out), "--budget-steps", "8",
                     "--epochs", epochs]) == 2
        assert f"--epochs {epochs}: with --budget-steps and no --max-steps" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ConfigError, match="--epochs 2: with --budget-steps and no --max-steps"):
        search(tmp_path / "api", tokenizer, TuneArgs(lrs=[0.1], budget_steps=8), max_steps=0, epochs=2)
    # with --max-steps the budget caps a search of fixed-length trials: --epochs is not read, and not refused
    result = search(tmp_path / "fixed", tokenizer, TuneArgs(lrs=[0.1], budget_steps=2), max_steps=2, epochs=2)
    assert result.trials[0].steps == 2


def test_a_search_point_the_task_cannot_build_is_skipped_before_any_trial_trains(tmp_path, tokenizer):
    from softprompt.data import TaskFormat
    from tests.conftest import sentiment_records
    from tests.test_train import FMT

    gen = TaskFormat(FMT.template, FMT.target_field)  # no verbalizer: a generation task, no labels to init from
    recs = sentiment_records(48, seed=1)
    data = TaskData(gen, {"train": [gen.render(r) for r in recs[:32]],
                          "validation": [gen.render(r) for r in recs[32:]]})
    result = search(tmp_path / "a", tokenizer, TuneArgs(lrs=[0.1], search={"init": ["random", "class_labels"]}),
                    data, max_steps=4)
    assert [t.spec.init for t in result.trials] == ["random"] and result.best is not None
    assert any(n.startswith("method=prompt_tuning num_virtual_tokens=4 init=class_labels: ") and "skipped" in n
               for n in result.notes), result.notes
    with pytest.raises(ConfigError, match="no combination can be built on this model and task"):
        search(tmp_path / "b", tokenizer, TuneArgs(lrs=[0.1], search={"init": ["class_labels"]}), data, max_steps=4)
    assert not (tmp_path / "b" / "trials").exists() or not any((tmp_path / "b" / "trials").iterdir())


def test_trials_validate_with_max_new_tokens(tmp_path, tokenizer, monkeypatch):
    import softprompt.evaluate as evaluate_mod
    from softprompt.data import TaskFormat
    from tests.conftest import sentiment_records
    from tests.test_train import FMT

    asked, real = [], evaluate_mod.generate_texts

    def recording(model, tok, prompt_kv, sources, max_new_tokens, *args, **kwargs):
        asked.append(max_new_tokens)
        return real(model, tok, prompt_kv, sources, max_new_tokens, *args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "generate_texts", recording)
    gen = TaskFormat(FMT.template, FMT.target_field)  # a generation task: validation decodes
    recs = sentiment_records(40, seed=1)
    data = TaskData(gen, {"train": [gen.render(r) for r in recs[:32]],
                          "validation": [gen.render(r) for r in recs[32:]]})
    successive_halving(make_model("llama"), tokenizer, data, PROMPT, base(tmp_path, max_steps=2, metric="exact_match"),
                       TuneArgs(lrs=[0.1]), max_new_tokens=3)
    assert asked and set(asked) == {3}


def test_trial_prompts_record_the_layout_they_trained_with(tmp_path, tokenizer):
    """An --objective lm trial trains [P, text] (no BOS after the prompt): its stored prompt says bos false, as
    train's does (tune saved bos true, so a PEFT export did not warn and a vLLM client added a BOS)."""
    from softprompt import cli
    from softprompt.store import load_prompt
    from tests.test_objective_lm import corpus_docs

    (tmp_path / "docs.txt").write_text("\n\n".join(corpus_docs(40)))
    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # the CLI: an lm corpus's task record (it saved a template record and every trial failed: exit 2)
    rc = cli.main([str(a) for a in ["tune", "--model", model_dir, "--objective", "lm", "--train-file",
                                    tmp_path / "docs.txt", "--output-dir", tmp_path / "lm", "--lrs", "0.1",
                                    "--budget-steps", "4", "--batch-size", "4", "--num-virtual-tokens", "2"]])
    assert rc == 0
    stored = load_prompt(tmp_path / "lm" / "best_prompt")
    assert stored.bos is False and stored.meta["task"]["objective"] == "lm"
    result = search(tmp_path / "task", tokenizer, TuneArgs(lrs=[0.1]), max_steps=2)
    assert load_prompt(result.trials[0].prompt_dir).bos is True


def test_an_lm_trials_epoch_is_counted_in_chunks_as_train_counts_it(tmp_path, tokenizer):
    """--objective lm: an epoch is the documents' chunks; tune counted documents, so a few long documents made
    a schedule of one step while train's epoch had many."""
    from softprompt.data.corpus import encode_corpus, load_corpus

    words = ["the", "movie", "was", "very", "good", "."]
    docs = [" ".join(words[(i + j) % 6] for j in range(120)) for i in range(12)]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs))
    data = load_corpus(train_file=tmp_path / "docs.txt")
    chunks = len(encode_corpus(tokenizer, [ex.target for ex in data.examples("train")], 16))
    assert chunks >= 4 * len(data.examples("train"))
    result = successive_halving(make_model("llama"), tokenizer, data, PROMPT,
                                TrainArgs(output_dir=str(tmp_path / "run"), epochs=1, batch_size=4,
                                          optimizer="adamw", metric="loss"),
                                TuneArgs(lrs=[0.1]), max_length=16, task_meta={})
    assert result.trials[0].steps == chunks // 4


@pytest.mark.parametrize(("world", "message"), [("abc", "WORLD_SIZE='abc' is not a process count"),
                                                ("2", "tune runs in one process")])
def test_tune_reads_the_launch_environment_as_train_does(tmp_path, tokenizer, monkeypatch, world, message):
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ConfigError, match=re.escape(message)):
        search(tmp_path, tokenizer, TuneArgs(lrs=[0.1]), max_steps=2)
