"""Tokenisation, truncation, collation and batching with a tiny in-memory tokenizer."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from softprompt.data import IGNORE_INDEX, DataError, Encoded, Example, batches, collate, encode

WORDS = ["[PAD]", "[EOS]", "[UNK]", "Review", ":", "good", "bad", "movie", "Sentiment", "positive",
         "negative", "very", "long"]
PAD, EOS = 0, 1
ID = {w: i for i, w in enumerate(WORDS)}


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer built in memory: one id per word, punctuation split off, no downloads."""
    inner = Tokenizer(models.WordLevel(ID, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def test_encode_concatenates_source_and_target(tok):
    examples = [Example("Review: good movie\nSentiment:", " positive", "positive"),
                Example("Review: bad\nSentiment:", " negative", "negative")]
    enc = encode(tok, examples)
    assert enc == [Encoded(ids("Review : good movie Sentiment : positive"), 6),
                   Encoded(ids("Review : bad Sentiment : negative"), 5)]
    assert enc[0].input_ids[:enc[0].target_start] == ids("Review : good movie Sentiment :")
    assert enc[0].input_ids[enc[0].target_start:] == [ID["positive"]]


def test_encode_appends_eos(tok):
    enc = encode(tok, [Example("Review: good", " positive")], append_eos=True)
    assert enc == [Encoded(ids("Review : good positive") + [EOS], 3)]
    assert enc[0].input_ids[enc[0].target_start:] == [ID["positive"], EOS]


def test_truncation_drops_source_start_and_keeps_target(tok):
    ex = Example("Review: very very long movie", " very good movie")  # 6 source + 3 target tokens
    enc = encode(tok, [ex], max_length=5, append_eos=True)[0]
    assert enc.input_ids == [ID["movie"], ID["very"], ID["good"], ID["movie"], EOS]
    assert enc.target_start == 1
    exact = encode(tok, [ex], max_length=3)[0]  # target fills max_length: no source left
    assert exact == Encoded(ids("very good movie"), 0)
    untouched = encode(tok, [ex], max_length=9)[0]
    assert untouched.target_start == 6 and len(untouched.input_ids) == 9


def test_encode_errors(tok):
    with pytest.raises(DataError, match=r"example 0: target ' very good movie' has 3 tokens, more than "
                                        r"--max-length 2"):
        encode(tok, [Example("Review:", " very good movie")], max_length=2)
    with pytest.raises(DataError, match="example 1: target ' ' has no tokens"):
        encode(tok, [Example("a", " good"), Example("b", " ")])
    assert encode(tok, []) == []


def test_encode_errors_name_the_record_s_file_and_line(tok, tmp_path):
    """They named a 0-based index into the list at hand (a sampled subset): "example 4" for line 40."""
    from softprompt.data import encode_classes, load_task

    lines = ['{"text": "good", "answer": "movie"}'] * 39 + ['{"text": "bad", "answer": "very good movie"}']
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    task = load_task(train_file=tmp_path / "t.jsonl", template="Review: {text}", target_field="answer")
    subset = task.examples("train")[35:]
    with pytest.raises(DataError, match=r"^t\.jsonl line 40: target ' very good movie' has 3 tokens"):
        encode(tok, subset, max_length=2)
    with pytest.raises(DataError, match=r"^t\.jsonl line 36: label None is not one of the task's labels"):
        encode_classes(tok, subset, ["x"])


def test_collate_right_padding():
    items = [Encoded([5, 6, 7, 8], 3), Encoded([9, 10], 1)]
    b = collate(items, pad_id=PAD)
    assert b.input_ids.dtype == torch.long and b.attention_mask.dtype == torch.long
    assert b.target_mask.dtype == torch.bool
    assert b.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, PAD, PAD]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b.target_mask.tolist() == [[False, False, False, True], [False, True, False, False]]
    assert b.labels.tolist() == [[IGNORE_INDEX] * 3 + [8], [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]]
    assert b.num_tokens == 6 and int(b.target_mask.sum()) == 2


def test_collate_left_padding():
    items = [Encoded([5, 6, 7, 8], 2), Encoded([9, 10], 1)]
    b = collate(items, pad_id=PAD, padding_side="left")
    assert b.input_ids.tolist() == [[5, 6, 7, 8], [PAD, PAD, 9, 10]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert b.target_mask.tolist() == [[False, False, True, True], [False, False, False, True]]
    with pytest.raises(DataError, match="padding_side must be 'left' or 'right'"):
        collate(items, PAD, padding_side="middle")
    with pytest.raises(DataError, match="empty list"):
        collate([], PAD)


def test_batch_to_returns_new_batch():
    b = collate([Encoded([1, 2], 1)], PAD)
    moved = b.to("cpu")
    assert moved is not b and torch.equal(moved.input_ids, b.input_ids)
    assert moved.target_mask.dtype == torch.bool


def test_batches_order_shuffle_and_sizes():
    enc = [Encoded([i, i + 100], 1) for i in range(7)]
    plain = list(batches(enc, batch_size=3, pad_id=PAD))
    assert [b.input_ids[:, 0].tolist() for b in plain] == [[0, 1, 2], [3, 4, 5], [6]]
    first = [b.input_ids[:, 0].tolist() for b in batches(enc, 3, PAD, shuffle=True, seed=1)]
    second = [b.input_ids[:, 0].tolist() for b in batches(enc, 3, PAD, shuffle=True, seed=1)]
    other = [b.input_ids[:, 0].tolist() for b in batches(enc, 3, PAD, shuffle=True, seed=2)]
    assert first == second and first != other
    assert sorted(sum(first, [])) == list(range(7)) and [len(b) for b in first] == [3, 3, 1]
    with pytest.raises(DataError, match="--batch-size must be >= 1"):
        batches(enc, 0, PAD)


@pytest.mark.slow
def test_smollm2_target_tokens_are_label_tokens():
    """With the real tokenizer the target ids equal the label texts' own ids (loaded offline)."""
    from transformers import AutoTokenizer

    from softprompt.data import load_task
    from softprompt.model import materialize_alias

    tokenizer = AutoTokenizer.from_pretrained(materialize_alias("smollm2-135m-instruct"))
    task = load_task("rotten_tomatoes", max_samples={"validation": 16})
    label_ids = {text: tokenizer(text, add_special_tokens=False)["input_ids"]
                 for text in task.format.label_texts}
    assert all(len(v) == 1 for v in label_ids.values())  # " positive" / " negative": one token each
    examples = task.examples("validation")
    enc = encode(tokenizer, examples, max_length=64, append_eos=True)
    for ex, e in zip(examples, enc, strict=True):
        assert e.input_ids[e.target_start:] == label_ids[ex.target] + [tokenizer.eos_token_id]
        assert len(e.input_ids) <= 64
    batch = collate(enc, tokenizer.pad_token_id or 0)
    assert int(batch.target_mask.sum()) == 2 * len(examples)


def test_a_long_source_is_cut_alike_whichever_label_follows_it(tokenizer):
    """Training cut a long source by its gold label's length and label scoring by each label's: a 3-token label
    was scored after less of the review than a 1-token one, and the gold label's length showed in the input."""
    from softprompt.data import TaskFormat
    from softprompt.forward import family_of
    from softprompt.forward.common import rows_per_label
    from tests.conftest import make_model

    fmt = TaskFormat("Review: {text}", "label", {"pos": "good", "neg": "very very good"})
    text = " ".join(["the", "movie", "was", "great", "plot", "a", "film", "is"] * 3)
    examples = [fmt.render({"text": text, "label": label}) for label in ("pos", "neg")]
    model = make_model("llama")
    enc = family_of(model).encode_examples(tokenizer, examples, fmt, max_length=12)
    sources = [e.input_ids[:e.target_start] for e in enc]
    assert sources[0] == sources[1] and len(sources[0]) == 12 - 3  # room for the longest label
    seen = []

    def record(model, batch, prompt):
        for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), strict=True):
            seen.append([t for t, m in zip(ids, mask, strict=True) if m])
        return torch.zeros(batch.input_ids.shape[0])

    rows_per_label(model, tokenizer, None, examples[:1], fmt, 8, 12, record)
    good, very = sorted(seen, key=len)
    assert good[:-1] == very[:-3] == sources[0]


@pytest.mark.parametrize(("verbalizer", "why"), [
    ({"pos": "good", "neg": "good film"}, "'neg''s tokens begin with all of 'pos''s"),
    ({"pos": "good film", "neg": "good"}, "'pos''s tokens begin with all of 'neg''s"),
    ({"pos": "good", "neg": " good"}, "tokenize alike, so the first always wins"),
])
def test_a_label_that_can_never_be_predicted_is_refused(tokenizer, verbalizer, why):
    # a label is scored by the summed log-probability of its tokens: one that extends another always scores lower
    # (" 10" after " 1" with a digit-splitting tokenizer) and was never predicted, with no word said
    from softprompt.data import TaskFormat, label_room

    fmt = TaskFormat("Review: {text}", "label", verbalizer)
    with pytest.raises(DataError, match=re.escape(why)):
        label_room(tokenizer, fmt)
    assert label_room(tokenizer, TaskFormat("Review: {text}", "label", {"pos": "good", "neg": "very good"})) == 2


def test_train_refuses_such_labels_before_training(tmp_path, capsys):
    from softprompt.cli import main
    from tests.conftest import make_model, make_tokenizer, sentiment_records, write_jsonl

    d = tmp_path / "tiny"
    make_model("llama").save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    write_jsonl(tmp_path / "train.jsonl", sentiment_records(16, seed=1))
    assert main(["train", "--model", str(d), "--train-file", str(tmp_path / "train.jsonl"), "--template",
                 "Review: {text}", "--target-field", "label", "--verbalizer", "positive=good,negative=good film",
                 "--output-dir", str(tmp_path / "run")]) == 2
    assert "labels 'positive' and 'negative'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_max_length_the_longest_label_fills_is_refused(tokenizer):
    # every source was cut to nothing (keep <= 0) and only examples of the long label itself raised
    fmt_labels = {"pos": "good", "neg": "very very very good"}
    from softprompt.data import TaskFormat, label_room

    fmt = TaskFormat("Review: {text}", "label", fmt_labels)
    examples = [fmt.render({"text": "the movie was great", "label": "pos"})]
    room = label_room(tokenizer, fmt)
    with pytest.raises(DataError, match="the longest label takes 4 tokens .+1 special.: --max-length 5 leaves no"):
        encode(tokenizer, examples, max_length=5, lead=[1], target_room=room)
    assert encode(tokenizer, examples, max_length=6, lead=[1], target_room=room)[0].target_start == 2
