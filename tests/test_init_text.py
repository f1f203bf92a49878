"""The default --init-text comes from the task being trained (issue 12, item 2)."""

from __future__ import annotations

import yaml

from softprompt.data import BUILTIN_DATASETS, TaskFormat, default_init_text, task_init_text
from tests.conftest import write_jsonl
from tests.test_cli import run

SENTIMENT = BUILTIN_DATASETS["rotten_tomatoes"].init_text


def test_a_classification_task_gets_its_template_words_and_answers():
    fmt = TaskFormat("Headline: {title}\nTopic:", "label",
                     {"w": "world", "s": "sports", "b": "business", "t": "science"})
    assert task_init_text(fmt) == "Headline: Topic: answer world, sports, business or science."
    assert task_init_text(TaskFormat("{a} vs {b}", "label", {"y": "yes", "n": "no"})) == "vs answer yes or no."
    assert task_init_text(TaskFormat("{text}", "label", {"p": "good", "n": "bad"})) == "Answer good or bad."


def test_a_generation_task_gets_its_template_words():
    assert task_init_text(TaskFormat("Question: {q}\n\nAnswer:", "a")) == "Question: Answer:"
    assert task_init_text(TaskFormat("{q}", "a")) == "Read the input and answer."


def test_built_in_datasets_keep_their_sentence_only_in_their_own_format():
    rt = BUILTIN_DATASETS["rotten_tomatoes"]
    assert default_init_text("rotten_tomatoes", rt.format) == SENTIMENT
    capitals = BUILTIN_DATASETS["capitals"].format
    assert default_init_text("capitals", capitals) == "Name the capital city of this country."
    other = TaskFormat("Text: {text}\nMood:", "label", {"positive": "happy", "negative": "sad"})
    assert default_init_text("rotten_tomatoes", other) == "Text: Mood: answer happy or sad."
    assert default_init_text(None, rt.format) == "Review: Sentiment: answer positive or negative."


def test_training_on_files_uses_the_task_init_text_and_records_it(tmp_path, tiny_model_dir):
    records = [{"text": f"{w} movie", "label": lab} for w, lab in
               [("good", "yes"), ("bad", "no"), ("great", "yes"), ("awful", "no")] * 4]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "run"
    rc, stdout, stderr = run(["train", "--model", tiny_model_dir, "--train-file", train, "--validation-file", train,
                              "--template", "Review: {text}\nGood:", "--target-field", "label",
                              "--verbalizer", "yes=very,no=not", "--num-virtual-tokens", "3", "--batch-size", "4",
                              "--max-steps", "1", "--eval-every", "1", "--baselines", "no_prompt",
                              "--output-dir", out])
    assert rc == 0, stderr
    expected = "Review: Good: answer very or not."
    assert f"init text {expected!r}" in stdout
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["prompt"]["init_text"] == expected != SENTIMENT
    rc, _, stderr = run(["train", "--model", tiny_model_dir, "--train-file", train, "--template", "{text}",
                         "--target-field", "label", "--init-text", "  ", "--output-dir", tmp_path / "x"])
    assert rc == 2 and "--init-text must not be empty" in stderr
