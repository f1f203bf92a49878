"""The comparison harness on a tiny model folder: every kind runs through the same loop and gets a row."""

from __future__ import annotations

import json

import pytest

from softprompt.cli import main
from softprompt.compare import Spec, run_one, weight_method
from softprompt.data import TaskData, TaskFormat
from softprompt.evaluate import evaluate_prompt
from tests.conftest import make_model, make_tokenizer, sentiment_records


def test_weight_methods_train_only_their_parameters():
    model = make_model("gpt2")
    bit = weight_method(model, Spec("b", "bitfit"))
    assert bit.num_trainable() == sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias")) > 0
    assert set(bit.state_dict()) == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    with pytest.raises(ValueError, match="no parameters of that kind"):
        weight_method(make_model("llama"), Spec("b", "bitfit"))  # llama has no biases
    pytest.importorskip("peft")
    lora_model = make_model("llama")
    lora = weight_method(lora_model, Spec("l", "lora", {"r": 2}))
    assert lora.num_trainable() > 0 and all("lora_" in n for n in lora.state_dict())


FMT = TaskFormat("Review: {text}\nSentiment:", "label", {"positive": "positive", "negative": "negative"})


def toy_task() -> TaskData:
    """A learnable sentiment task (one word decides the label): 32 train, 16 test examples, half positive."""
    recs = sentiment_records(48, seed=2)
    return TaskData(FMT, {"train": [FMT.render(r) for r in recs[:32]], "test": [FMT.render(r) for r in recs[32:]]})


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning", "lora", "full"])
def test_run_one_trains_and_evaluates_each_kind(tiny_model_dir, kind, monkeypatch):
    import softprompt.evaluate

    data = toy_task()
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: data)
    seen = []  # (prompt_kv, predictions) of every evaluation run_one makes

    def spy(*args, **kwargs):
        metrics, preds = evaluate_prompt(*args, **kwargs)
        seen.append((args[2], preds))
        return metrics, preds

    monkeypatch.setattr(softprompt.evaluate, "evaluate_prompt", spy)
    cfg = {"prompt_tuning": {"num_virtual_tokens": 3, "init": "random"},
           "prefix_tuning": {"num_virtual_tokens": 3, "init": "random"}}.get(kind, {"r": 2} if kind == "lora" else {})
    row = run_one(Spec(kind, kind, cfg, "adamw", 1e-2), str(tiny_model_dir), "x", steps=3, batch_size=8,
                  test_samples=16)
    assert row["trainable_params"] > 0 and row["bytes_per_task"] > 0
    # the reported accuracy is the test split's, recomputed here from the predictions it was made of
    (kv, preds), = seen
    assert [p.expected for p in preds] == [ex.label for ex in data.examples("test")]
    assert row["accuracy"] == sum(p.expected == p.predicted for p in preds) / 16
    assert (kv is None) == (kind in ("lora", "full"))  # prompt methods are evaluated with their prompt
    if kind == "full":
        assert row["trainable_params"] == sum(p.numel() for p in make_model("llama").parameters())


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_run_one_learns_the_toy_task_the_untrained_model_cannot(tiny_model_dir, kind, monkeypatch):
    data = toy_task()
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: data)
    untrained, _ = evaluate_prompt(make_model("llama"), make_tokenizer(), None, data.examples("test"), FMT)
    assert untrained["accuracy"] <= 9 / 16  # the random tiny model is at chance
    cfg, lr = ({"r": 2}, 0.1) if kind == "lora" else ({}, 1e-2)
    row = run_one(Spec(kind, kind, cfg, "adamw", lr), str(tiny_model_dir), "x", steps=12, batch_size=8,
                  test_samples=16)
    assert row["accuracy"] == 1.0


def test_compare_command_keep_going_writes_table_json_and_chart_and_fails(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", str(tiny_model_dir), "--dataset", "capitals", "--steps", "2",
               "--batch-size", "4", "--test-samples", "4", "--only", "prompt_tuning,bitfit", "--output-dir", str(out),
               "--keep-going"])
    assert rc == 1  # BitFit cannot run on the tiny llama (no biases): the table lacks a method
    rows = json.loads((out / "compare.json").read_text())
    assert len(rows) == 6  # five prompt-tuning variants and BitFit
    assert "error" in rows[-1] and "no parameters of that kind" in rows[-1]["error"]  # tiny llama: no biases
    assert all("accuracy" in r for r in rows[:5])
    assert (out / "compare.png").stat().st_size > 0 and "| method |" in (out / "compare.md").read_text()
    captured = capsys.readouterr()
    assert "trainable params" in captured.out
    assert captured.err.splitlines() == [
        "softprompt compare: error: 1 of 6 methods failed:",
        "  BitFit (biases): ValueError: BitFit (biases): this model has no parameters of that kind"]
    assert main(["compare", "--only", "dropout"]) == 2


def test_compare_command_stops_at_the_first_failed_method(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", str(tiny_model_dir), "--dataset", "capitals", "--steps", "1",
               "--batch-size", "2", "--test-samples", "2", "--only", "bitfit,full", "--output-dir", str(out)])
    assert rc == 1
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["BitFit (biases)"] and "no parameters of that kind" in rows[0]["error"]
    assert "| BitFit (biases) |" in (out / "compare.md").read_text()
    err = capsys.readouterr().err.splitlines()
    assert err == ["softprompt compare: error: 1 of 2 methods failed:",
                   "  BitFit (biases): ValueError: BitFit (biases): this model has no parameters of that kind",
                   "  not run (the first failure stops the comparison; --keep-going runs them): full fine-tuning"]


def test_compare_help_documents_exit_status_and_keep_going(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--keep-going" in text and "exit status: 0 when every method ran; 1 when a method failed" in text


@pytest.mark.parametrize(("kind", "guarded"), [("prompt_tuning", True), ("lora", True), ("full", False)])
def test_compare_runs_the_divergence_guard_except_for_full_fine_tuning(tiny_model_dir, kind, guarded, monkeypatch):
    import softprompt.train

    data = toy_task()
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: data)
    seen = []

    def fake_train(model, tok, method, task, args, **kwargs):
        seen.append(args.divergence_guard)
        raise RuntimeError("stop here")

    monkeypatch.setattr(softprompt.train, "train", fake_train)
    cfg = {"prompt_tuning": {"num_virtual_tokens": 3, "init": "random"}, "lora": {"r": 2}}.get(kind, {})
    with pytest.raises(RuntimeError, match="stop here"):
        run_one(Spec(kind, kind, cfg, "adamw", 1e-2), str(tiny_model_dir), "x", steps=3, batch_size=8,
                test_samples=16)
    assert seen == [guarded]
