"""Metrics, rank classification (fast and general paths), baselines as hard prompts."""

from __future__ import annotations

import pytest
import torch

from softprompt import forward
from softprompt.data import Example, TaskFormat, collate, encode
from softprompt.evaluate import (
    evaluate_prompt,
    format_report,
    hard_prompt_kv,
    k_shot_examples,
    label_scores,
    macro_f1,
    normalize_answer,
    shots_text,
    token_f1,
)
from softprompt.forward import causal
from softprompt.selection import dominance_threshold, metric_note, primary_metric
from tests.conftest import sentiment_records, text_logits

FMT = TaskFormat("Review: {text}\nSentiment:", "label", {"positive": "positive", "negative": "negative"})
FMT2 = TaskFormat("Review: {text}\nSentiment:", "label", {"positive": "very good", "negative": "not good"})


def test_macro_f1_and_answer_metrics():
    assert macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"]) == pytest.approx((2 / 3 + 0.8) / 2)
    assert macro_f1(["a", "b"], ["a", "a"], ["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)
    # a label of the task that the split lacks and nothing predicts has no F1: it does not count as 0
    assert macro_f1(["a", "b"], ["a", "b"], ["a", "b", "c"]) == 1.0
    assert macro_f1(["a", "b"], ["a", "c"], ["a", "b", "c"]) == pytest.approx((1 + 0 + 0) / 3)  # c predicted
    assert normalize_answer(" The  Paris!") == "paris"
    assert token_f1("New Delhi", "delhi") == pytest.approx(2 / 3)
    assert token_f1("Paris", "Rome") == 0.0


def test_auto_selects_by_macro_f1_where_one_label_makes_accuracy_a_poor_selection_metric():
    def examples(labels):
        return [Example("x", f" {label}", label=label) for label in labels]

    skewed, even = examples(["negative"] * 6 + ["positive"] * 4), examples(["negative"] * 5 + ["positive"] * 4)
    assert primary_metric(FMT, "auto", skewed) == ("macro_f1", True)  # 60%: a constant answer scores 0.6
    assert primary_metric(FMT, "auto", even) == ("accuracy", True)  # 56%
    assert primary_metric(FMT) == ("accuracy", True) and primary_metric(FMT, "auto", []) == ("accuracy", True)
    assert primary_metric(FMT, "accuracy", skewed) == ("accuracy", True)  # asked for: kept
    assert primary_metric(FMT, "loss", skewed) == ("loss", False)
    generation = TaskFormat("Q: {q}\nA:", "a")
    assert primary_metric(generation, "auto", skewed) == ("exact_match", True)
    note = metric_note(FMT, skewed)
    assert "label 'negative' is 60% of the 10 examples" in note and "selected by macro-F1" in note
    assert metric_note(FMT, even) is None and metric_note(generation, skewed) is None and metric_note(FMT, []) is None
    assert metric_note(FMT, skewed, "accuracy") is None and metric_note(FMT, skewed, "macro_f1") is None



def test_auto_dominance_scales_with_the_label_count():
    """A label's share counts against an even split of the task's labels: 45% of a 4-label split (1.8 times its
    even share) selects by macro-F1, which the fixed 60% of two labels did not; two labels keep 60%."""
    four = TaskFormat("Text: {text}\nTopic:", "label", {t: t for t in ("world", "sports", "business", "science")})

    def examples(counts):
        return [Example("x", f" {label}", label=label) for label, n in counts.items() for _ in range(n)]

    assert [round(dominance_threshold(k), 3) for k in (2, 3, 4, 10)] == [0.6, 0.467, 0.4, 0.28]
    skewed = examples({"world": 9, "sports": 4, "business": 4, "science": 3})  # 45%
    even = examples({"world": 7, "sports": 5, "business": 4, "science": 4})  # 35%
    assert primary_metric(four, "auto", skewed) == ("macro_f1", True)
    assert primary_metric(four, "auto", even) == ("accuracy", True)
    assert "label 'world' is 45% of the 20 examples" in metric_note(four, skewed)
    # the task's label count, not the labels a small split happens to hold: 55% of 2 seen, of 4 labels
    two_seen = examples({"world": 11, "sports": 9})
    assert primary_metric(four, "auto", two_seen) == ("macro_f1", True)
    assert primary_metric(FMT, "auto", examples({"negative": 11, "positive": 9})) == ("accuracy", True)  # 55% of 2


def test_single_token_fast_path_equals_row_per_label(model, tokenizer):
    torch.manual_seed(0)
    kv = forward.compute_prompt_kv(model, torch.randn(4, 32))
    examples = [FMT.render(r) for r in sentiment_records(10)]
    fast = label_scores(model, tokenizer, kv, examples, FMT, batch_size=3)
    rows = [Example(ex.source, t) for ex in examples for t in FMT.label_texts]
    batch = collate(encode(tokenizer, rows), tokenizer.pad_token_id)
    slow = causal.target_logprobs(model, batch, kv).view(10, 2)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_multi_token_labels_sum_token_logprobs(model, tokenizer):
    examples = [FMT2.render(r) for r in sentiment_records(5)]
    scores = label_scores(model, tokenizer, None, examples, FMT2, batch_size=2)
    enc = encode(tokenizer, [Example(examples[3].source, " not good")])
    logits = text_logits(model, collate(enc, 0).input_ids, collate(enc, 0).attention_mask).log_softmax(-1)
    ids, start = enc[0].input_ids, enc[0].target_start
    expected = float(logits[0, start - 1, ids[start]] + logits[0, start, ids[start + 1]])
    assert scores.shape == (5, 2)
    assert float(scores[3, 1]) == pytest.approx(expected, abs=1e-5)


def test_hard_prompt_kv_equals_prepending_text(model, tokenizer):
    ex = FMT.render({"text": "good movie", "label": "positive"})
    kv = hard_prompt_kv(model, tokenizer, "Classify sentiment .")
    with_kv = label_scores(model, tokenizer, kv, [ex], FMT, 1)
    joined = Example("Classify sentiment ." + ex.source, ex.target, ex.label)
    plain = label_scores(model, tokenizer, None, [joined], FMT, 1)
    torch.testing.assert_close(with_kv, plain, atol=1e-5, rtol=1e-5)


def test_k_shot_text_is_balanced_and_seeded():
    examples = [FMT.render(r) for r in sentiment_records(20)]
    def k_shot_text(seed):
        return shots_text(k_shot_examples(examples, FMT, 4, seed=seed))

    text = k_shot_text(1)
    assert text.count(" positive\n\n") == 2 and text.count(" negative\n\n") == 2
    assert text == k_shot_text(1) != k_shot_text(2)


def test_evaluate_prompt_classification_and_generation(model, tokenizer):
    examples = [FMT.render(r) for r in sentiment_records(8)]
    m, preds = evaluate_prompt(model, tokenizer, None, examples, FMT, batch_size=4)
    assert set(m) == {"n", "accuracy", "macro_f1", "loss", "perplexity"} and m["n"] == 8
    assert m["accuracy"] == sum(p.expected == p.predicted for p in preds) / 8
    gen_fmt = TaskFormat("Country: {country}\nCapital:", "capital")
    gex = [gen_fmt.render({"country": "France", "capital": "Paris"})]
    g, gp = evaluate_prompt(model, tokenizer, None, gex, gen_fmt, max_new_tokens=3)
    assert {"exact_match", "f1", "loss"} <= set(g) and gp[0].expected == "Paris"
    assert g["exact_match"] == float(normalize_answer(gp[0].predicted) == "paris")


def test_format_report_aligns_rows():
    text = format_report({"a": {"accuracy": 0.5, "n": 10}, "longer name": {"accuracy": 0.75, "n": 10}})
    lines = text.splitlines()
    assert "accuracy" in lines[0] and lines[2].startswith("longer name") and "0.7500" in lines[2]


@pytest.mark.parametrize("verbalizer", [{"positive": "positive", "negative": "negative"},
                                        {"positive": "very good", "negative": "not good"}])
def test_classification_loss_from_label_scores_equals_target_loss(model, tokenizer, verbalizer):
    from softprompt.data import encode
    from softprompt.evaluate import mean_target_loss

    fmt = TaskFormat("Review: {text}\nSentiment:", "label", verbalizer)
    examples = [fmt.render(r) for r in sentiment_records(10)]
    kv = forward.compute_prompt_kv(model, torch.randn(3, 32))
    m, _ = evaluate_prompt(model, tokenizer, kv, examples, fmt, batch_size=4)
    direct = mean_target_loss(model, encode(tokenizer, examples), tokenizer.pad_token_id, kv, 4)
    assert m["loss"] == pytest.approx(direct, rel=1e-5)


def test_engine_evaluation_equals_single_prompt_evaluation(model, tokenizer):
    from softprompt.engine import Engine
    from softprompt.evaluate import evaluate_on_engine, hard_prompt_kv

    engine = Engine(model, tokenizer, max_batch_rows=3)
    tuned = forward.compute_prompt_kv(model, torch.randn(4, 32))
    hard = hard_prompt_kv(model, tokenizer, "Classify sentiment .")
    gen_fmt = TaskFormat("Country: {country}\nCapital:", "capital")
    for f, examples in [(FMT, [FMT.render(r) for r in sentiment_records(9)]),
                        (gen_fmt, [gen_fmt.render({"country": c, "capital": k})
                                   for c, k in [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome")]])]:
        engine.add_base("none", f)
        engine.add_kv("tuned", tuned, f)
        engine.add_kv("hard", hard, f)
        report = evaluate_on_engine(engine, {"a": "none", "b": "tuned", "c": "hard"}, examples, f, max_new_tokens=3)
        for row, kv in [("a", None), ("b", tuned), ("c", hard)]:
            single, _ = evaluate_prompt(model, tokenizer, kv, examples, f, batch_size=2, max_new_tokens=3)
            assert report[row] == pytest.approx(single, rel=1e-4, abs=1e-5), row


def test_a_generation_tasks_loss_counts_the_eos_that_ends_each_answer(model, tokenizer):
    """Training ends every answer with the EOS (the model learns to stop): the validation loss (evaluate_prompt,
    which --metric loss, --stop-when-flat and tune rank by) and the final report's (the engine) score the same
    tokens. Both left the EOS out; the reference here is an independent per-example forward."""
    import torch.nn.functional as F

    from softprompt.engine import Engine
    from softprompt.evaluate import evaluate_on_engine

    fmt = TaskFormat("Country: {text}\nCapital:", "label")
    examples = [fmt.render({"text": c, "label": f" {a}"}) for c, a in [("France", "Paris"), ("Spain", "Madrid"),
                                                                           ("Italy", "the Rome")]]
    torch.manual_seed(0)
    kv = forward.compute_prompt_kv(model, torch.randn(3, model.config.hidden_size) * 0.5)
    eos, nll, count = tokenizer.eos_token_id, 0.0, 0
    for ex in examples:
        src = tokenizer(ex.source, add_special_tokens=False)["input_ids"]
        tgt = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [eos]
        ids = torch.tensor([src + tgt])
        with torch.no_grad():
            logits = text_logits(model, ids, torch.ones_like(ids), kv)[0]
        nll += float(F.cross_entropy(logits[len(src) - 1:-1], ids[0, len(src):], reduction="sum"))
        count += len(tgt)
    reference = nll / count
    metrics, _ = evaluate_prompt(model, tokenizer, kv, examples, fmt, max_new_tokens=2)
    assert metrics["loss"] == pytest.approx(reference, rel=1e-4)
    engine = Engine(model, tokenizer)
    engine.add_kv("p", kv, fmt)
    report = evaluate_on_engine(engine, {"tuned": "p"}, examples, fmt, max_new_tokens=2)
    assert report["tuned"]["loss"] == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
def test_label_scores_with_sliding_windows_equal_each_example_scored_alone(kind, tokenizer):
    """The one-forward label path read sources left-padded: transformers counts a sliding window in columns,
    so a row with padding lost prompt keys a window early (Gemma3: 5 of 6 layers); batched scores must
    equal each example scored alone."""
    from tests.test_running import _windowed

    model = _windowed(kind)
    torch.manual_seed(0)
    kv = forward.compute_prompt_kv(model, torch.randn(3, 32) * 0.5)
    words = ["good", "movie", "the", "plot", "was", "very", "bad"]
    exs = [FMT.render({"text": " ".join(words[: 1 + (i * 3) % 7]), "label": "positive"}) for i in range(6)]
    batched = label_scores(model, tokenizer, kv, exs, FMT, batch_size=6)
    alone = torch.cat([label_scores(model, tokenizer, kv, [ex], FMT, batch_size=1) for ex in exs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
def test_generation_with_sliding_windows_equals_each_source_decoded_alone(kind, tokenizer):
    from softprompt.evaluate import generate_texts
    from tests.test_running import _windowed

    model = _windowed(kind)
    torch.manual_seed(0)
    kv = forward.compute_prompt_kv(model, torch.randn(3, 32) * 0.5)
    words = ["good", "movie", "the", "plot", "was", "very", "bad"]
    sources = [FMT.render({"text": " ".join(words[: 1 + (i * 3) % 7]), "label": "positive"}).source for i in range(6)]
    batched = generate_texts(model, tokenizer, kv, sources, 4, batch_size=6, stop=None)
    alone = [generate_texts(model, tokenizer, kv, [s], 4, batch_size=1, stop=None)[0] for s in sources]
    assert batched == alone


def test_generation_keeps_its_batches_when_no_row_can_reach_past_the_window(tokenizer, monkeypatch):
    """Grouping by length costs a forward per length: only when a row could reach past the window (Mistral's
    4096 or Gemma 2's with --max-length 256 ran in batches of about one)."""
    import softprompt.evaluate as evaluate
    from softprompt.evaluate import generate_texts
    from tests.test_running import _windowed

    model = _windowed("mistral")
    model.config.sliding_window = 4096
    calls, real = [], evaluate.generate

    def count(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", count)
    sources = [FMT.render({"text": " ".join(["good"] * (1 + i)), "label": "positive"}).source for i in range(6)]
    generate_texts(model, tokenizer, None, sources, 2, batch_size=6, stop=None)
    assert len(calls) == 1
    model.config.sliding_window = 6
    generate_texts(model, tokenizer, None, sources, 2, batch_size=6, stop=None)
    assert len(calls) == 1 + 6  # six lengths


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_k_shot_context_keeps_the_shots_that_fit_the_models_positions(kind, tokenizer, monkeypatch, caplog):
    """--k-shot 8 of whole long training sources became one context past the model's positions: an IndexError on
    GPT-2's learned positions, a TooLongError naming 'condition2' on RoPE. Each shot is cut as training cuts it
    (--max-length 32), and as many as fit beside the longest test input (32 tokens) are kept: 2 of 100 positions."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from softprompt.config import DataArgs, EvalArgs
    from softprompt.data import TaskData
    from softprompt.model import prepare_frozen
    from softprompt.workflows import baselines

    torch.manual_seed(0)
    model = (GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=100,
                                        eos_token_id=1, pad_token_id=0)) if kind == "gpt2" else
             LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=100,
                                          pad_token_id=0, bos_token_id=None, eos_token_id=1)))
    prepare_frozen(model)
    long = " ".join(["the movie was very"] * 25)  # 100 words: a source of 103 tokens
    recs = [{"text": f"{long} {'good' if i % 2 else 'bad'}", "label": "positive" if i % 2 else "negative"}
            for i in range(12)]
    data = TaskData(FMT, {"train": [FMT.render(r) for r in recs[:8]], "test": [FMT.render(r) for r in recs[8:]]})
    contexts = []
    real = baselines.hard_prompt_kv
    monkeypatch.setattr(baselines, "hard_prompt_kv", lambda m, t, text, *a: contexts.append(text) or real(m, t, text))
    args = {"eval": EvalArgs(k_shot=8, baselines=["k_shot"]), "data": DataArgs(max_length=32)}
    with caplog.at_level("WARNING", logger="softprompt"):
        report = baselines.evaluate_with_baselines(model, tokenizer, data, args, "", data.examples("test"))
    assert list(report) == ["2-shot prompting"] and report["2-shot prompting"]["n"] == 4
    assert len(tokenizer(contexts[0], add_special_tokens=False)["input_ids"]) == 64  # 2 shots of 31 + 1 label
    assert contexts[0].split()[:4] == ["the", "movie", "was", "very"] and contexts[0].count("Sentiment:") == 2
    assert "--k-shot 8: the 8 shots take 256 tokens" in caplog.text and "the row holds 2 shot(s)" in caplog.text
