"""The comparison harness on a tiny model folder: every kind runs through the same loop and gets a row."""

from __future__ import annotations

import json

import pytest

from softprompt.cli import main
from softprompt.compare import Spec, run_one, weight_method
from tests.conftest import make_model


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


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning", "lora", "full"])
def test_run_one_trains_and_evaluates_each_kind(tiny_model_dir, kind, monkeypatch):
    from softprompt.data import TaskData, TaskFormat
    from tests.conftest import sentiment_records

    fmt = TaskFormat("Review: {text}\nSentiment:", "label", {"positive": "positive", "negative": "negative"})
    recs = sentiment_records(48, seed=2)
    data = TaskData(fmt, {"train": [fmt.render(r) for r in recs[:32]], "test": [fmt.render(r) for r in recs[32:]]})
    monkeypatch.setattr("softprompt.data.load_task", lambda *a, **k: data)
    cfg = {"prompt_tuning": {"num_virtual_tokens": 3, "init": "random"},
           "prefix_tuning": {"num_virtual_tokens": 3, "init": "random"}}.get(kind, {"r": 2} if kind == "lora" else {})
    row = run_one(Spec(kind, kind, cfg, "adamw", 1e-2), str(tiny_model_dir), "x", steps=3, batch_size=8,
                  test_samples=16)
    assert row["trainable_params"] > 0 and row["bytes_per_task"] > 0 and 0 <= row["accuracy"] <= 1
    if kind == "full":
        assert row["trainable_params"] == sum(p.numel() for p in make_model("llama").parameters())


def test_compare_command_writes_table_json_and_chart(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", str(tiny_model_dir), "--dataset", "capitals", "--steps", "2",
               "--batch-size", "4", "--test-samples", "4", "--only", "prompt_tuning,bitfit", "--output-dir", str(out)])
    assert rc == 0
    rows = json.loads((out / "compare.json").read_text())
    assert len(rows) == 6  # five prompt-tuning variants and BitFit
    assert "error" in rows[-1] and "no parameters of that kind" in rows[-1]["error"]  # tiny llama: no biases
    assert all("accuracy" in r for r in rows[:5])
    assert (out / "compare.png").stat().st_size > 0 and "| method |" in (out / "compare.md").read_text()
    assert "trainable params" in capsys.readouterr().out
    assert main(["compare", "--only", "dropout"]) == 2
