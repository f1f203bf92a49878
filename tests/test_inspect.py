"""Interpretability of stored prompts: nearest tokens, norms, similarity, report, and `softprompt inspect`."""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics

import pytest
import torch

from softprompt.cli_inspect import add_inspect_parser
from softprompt.config import ConfigError
from softprompt.interpret import (
    format_inspect,
    inspect_report,
    nearest_tokens,
    prompt_norms,
    prompt_similarity,
    token_space_embeddings,
)
from softprompt.methods import build_method
from softprompt.store import PromptStore, StoredPrompt, StoreError, save_prompt
from tests.conftest import WORD_IDS, WORDS, make_model, make_tokenizer

H = 32
KNOWN = ["good", "bad", "movie", "Paris"]


def table(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()  # (V, H)


def rows_of(model, words: list[str]) -> torch.Tensor:
    return table(model)[[WORD_IDS[w] for w in words]].clone()  # (P, H)


def brute_force(embeds: torch.Tensor, matrix: torch.Tensor, k: int) -> list[list[int]]:
    """Top-k ids by float64 cosine over the whole matrix at once, ties to the lowest id."""
    e = torch.nn.functional.normalize(embeds.double(), dim=1)
    m = torch.nn.functional.normalize(matrix.double(), dim=1)
    sims = (e @ m.T).tolist()  # (P, V)
    return [sorted(range(len(row)), key=lambda i, row=row: (-row[i], i))[:k] for row in sims]


# ----- nearest tokens ------------------------------------------------------------------------------------


def test_known_token_rows_are_their_own_nearest(model, tokenizer):
    near = nearest_tokens(rows_of(model, KNOWN), table(model), tokenizer, k=3)
    assert [row[0][:2] for row in near] == [(w, WORD_IDS[w]) for w in KNOWN]
    assert all(row[0][2] == pytest.approx(1.0, abs=1e-6) for row in near)
    assert all(len(row) == 3 and row[0][2] > row[1][2] >= row[2][2] for row in near)
    # scaling a vector does not change its cosine neighbours
    scaled = nearest_tokens(rows_of(model, KNOWN) * 7.5, table(model), tokenizer, k=3)
    assert [[t[1] for t in r] for r in scaled] == [[t[1] for t in r] for r in near]


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 32, 10_000])
def test_chunked_search_matches_brute_force(model, tokenizer, chunk_rows):
    embeds = torch.randn(6, H, generator=torch.Generator().manual_seed(3))
    near = nearest_tokens(embeds, table(model), tokenizer, k=5, chunk_rows=chunk_rows)
    # only rows the tokenizer has a token for are candidates (the tiny model pads 32 words to 64 rows)
    assert [[t[1] for t in row] for row in near] == brute_force(embeds, table(model)[: len(WORDS)], 5)
    for row, e in zip(near, embeds, strict=True):
        for token, tid, cos in row:
            assert token == WORDS[tid]
            assert cos == pytest.approx(float(torch.cosine_similarity(e, table(model)[tid], dim=0)), abs=1e-6)


def test_rows_without_a_token_are_never_returned(model, tokenizer):
    beyond = table(model)[[40, 63]]  # rows of the padded matrix that no token maps to
    near = nearest_tokens(beyond, table(model), tokenizer, k=4)
    assert all(tid < len(WORDS) for row in near for _, tid, _ in row)
    assert [[t[1] for t in r] for r in near] == brute_force(beyond, table(model)[: len(WORDS)], 4)


@pytest.mark.parametrize("chunk_rows", [1, 2, 5, 100])
def test_ties_are_ordered_by_token_id(tokenizer, chunk_rows):
    matrix = torch.zeros(len(WORDS), 4)
    matrix[:, 3] = 1.0  # every row points the same way ...
    matrix[[9, 2, 20], 0] = 5.0  # ... but rows 2, 9, 20 point (equally) closer to the query
    matrix[0] = 0.0  # a zero row: cosine 0, not NaN
    query = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    near = nearest_tokens(query, matrix, tokenizer, k=5, chunk_rows=chunk_rows)[0]
    assert [t[1] for t in near] == [2, 9, 20, 0, 1]
    assert [t[0] for t in near[:3]] == ["[UNK]", "bad", "not"]
    assert near[3][2] == 0.0 and not any(math.isnan(t[2]) for t in near)


def test_k_larger_than_vocabulary_and_bad_arguments(model, tokenizer):
    near = nearest_tokens(rows_of(model, ["good"]), table(model), tokenizer, k=100)
    assert sorted(t[1] for t in near[0]) == list(range(len(WORDS)))
    with pytest.raises(ValueError, match="k and chunk_rows must be >= 1"):
        nearest_tokens(rows_of(model, ["good"]), table(model), tokenizer, k=0)
    with pytest.raises(ValueError, match=re.escape("got (2, 16) and (64, 32)")):
        nearest_tokens(torch.zeros(2, 16), table(model), tokenizer)


# ----- norms ---------------------------------------------------------------------------------------------


def test_prompt_norms_match_torch(model):
    embeds = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    norms = prompt_norms(embeds, table(model))
    expected = torch.linalg.norm(embeds, dim=1)
    assert norms["token_norms"] == pytest.approx(expected.tolist(), rel=1e-6)
    assert norms["mean"] == pytest.approx(float(expected.mean()), rel=1e-6)
    assert norms["min"] == pytest.approx(float(expected.min()), rel=1e-6)
    assert norms["max"] == pytest.approx(float(expected.max()), rel=1e-6)
    vocab = torch.linalg.norm(table(model), dim=1).tolist()
    assert norms["vocab_mean"] == pytest.approx(statistics.fmean(vocab), rel=1e-6)
    assert norms["vocab_median"] == pytest.approx(statistics.median(vocab), rel=1e-6)
    assert norms["ratio"] == pytest.approx(float(expected.mean()) / statistics.fmean(vocab), rel=1e-6)


# ----- similarity ----------------------------------------------------------------------------------------


def test_similarity_hand_computed_and_different_lengths():
    a = torch.tensor([[1.0, 0.0]])  # (1, 2)
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # (2, 2)
    names, pooled, aligned = prompt_similarity({"a": a, "b": b})
    assert names == ["a", "b"]
    # mean-pooled b is (1, 1.5): cos with (1, 0) = 1 / sqrt(1 + 1.5^2)
    assert pooled[0, 1].item() == pytest.approx(1 / math.sqrt(3.25), abs=1e-12)
    # a->b: 1 (a's token matches b's first); b->a: (1 + 0) / 2; symmetrised: 0.75
    assert aligned[0, 1].item() == pytest.approx(0.75, abs=1e-12)
    assert torch.equal(pooled, pooled.T) and torch.equal(aligned, aligned.T)


def test_similarity_self_is_one_and_symmetric(model):
    gen = torch.Generator().manual_seed(5)
    prompts = {"x": torch.randn(4, H, generator=gen), "y": torch.randn(7, H, generator=gen),
               "words": rows_of(model, KNOWN), "one": torch.randn(1, H, generator=gen)}
    sim = prompt_similarity(prompts)
    assert sim.names == ["x", "y", "words", "one"] and sim.pooled.shape == sim.aligned.shape == (4, 4)
    for m in (sim.pooled, sim.aligned):
        assert torch.allclose(m.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-12)
        assert torch.equal(m, m.T)
        assert bool((m <= 1 + 1e-12).all()) and bool((m >= -1 - 1e-12).all())
    # a prompt and its reordered, rescaled copy are fully aligned
    shuffled = prompts["x"][[3, 1, 0, 2]] * 2
    assert prompt_similarity({"x": prompts["x"], "s": shuffled}).aligned[0, 1].item() == pytest.approx(1.0)


def test_similarity_refuses_different_widths():
    with pytest.raises(ValueError, match=re.escape("different widths and cannot be compared: {'a': 32, 'b': 16}")):
        prompt_similarity({"a": torch.ones(2, 32), "b": torch.ones(2, 16)})
    with pytest.raises(ValueError, match=re.escape("c: shape (4,)")):
        prompt_similarity({"c": torch.ones(4)})


# ----- token space ---------------------------------------------------------------------------------------


def test_token_space_embeddings_accepts_only_hidden_width():
    emb = torch.ones(4, H)
    assert token_space_embeddings("ok", {"prompt_embeddings": emb}, H) is emb
    with pytest.raises(ValueError, match=re.escape("wide: 'prompt_embeddings' has shape (4, 64), not (P, 32)")):
        token_space_embeddings("wide", {"prompt_embeddings": torch.ones(4, 64)}, H)
    with pytest.raises(ValueError, match=re.escape("flat: 'prompt_embeddings' has shape (128,), not (P, 32)")):
        token_space_embeddings("flat", {"prompt_embeddings": torch.ones(128)}, H)
    with pytest.raises(ValueError, match=re.escape("prefix: has no 'prompt_embeddings' tensor "
                                                   "(tensors: {'past_key_values': (4, 128)})")):
        token_space_embeddings("prefix", {"past_key_values": torch.ones(4, 128)}, H)


# ----- report --------------------------------------------------------------------------------------------


def test_a_top_k_beyond_the_vocabulary_is_lowered_to_it(model, tokenizer):
    # the text table was sized by --top-k: 10**9 columns (memory exhaustion) for a 32-token vocabulary
    report = inspect_report({"p": rows_of(model, ["good", "bad"])}, table(model), tokenizer, k=10**9)
    tokens = report["prompts"][0]["tokens"]
    assert report["top_k"] == len(WORDS) and all(len(t["nearest"]) == len(WORDS) for t in tokens)
    assert report["notes"] == [f"--top-k 1000000000 is more than the {len(WORDS)} vocabulary tokens: all "
                               f"{len(WORDS)} are shown"]
    header = next(line for line in format_inspect(report).splitlines() if line.split()[:2] == ["#", "NORM"])
    assert len(header.split()) == 2 + 2 * len(WORDS)


def test_the_vocabulary_norms_leave_out_rows_past_the_tokenizer(model, tokenizer):
    # the tiny model has 64 rows for 32 tokens: the padding rows, never an input, were averaged in
    matrix = table(model).clone()
    matrix[len(WORDS):] *= 10  # padding rows of another size
    report = inspect_report({"p": rows_of(model, ["good"])}, matrix, tokenizer, k=1)
    norms = torch.linalg.vector_norm(matrix[:len(WORDS)].float(), dim=1)
    assert report["vocab"]["size"] == len(WORDS)
    assert report["vocab"]["mean_norm"] == pytest.approx(float(norms.mean()), rel=1e-5)
    assert report["prompts"][0]["norms"]["ratio"] == pytest.approx(float(norms[WORD_IDS["good"]] / norms.mean()),
                                                                    rel=1e-4)


def test_report_is_json_and_text_is_aligned(model, tokenizer):
    prompts = {"sentiment": rows_of(model, ["good", "bad"]), "capital": rows_of(model, ["Paris", "Madrid", "Rome"])}
    report = inspect_report(prompts, table(model), tokenizer, k=2, model_name="tiny",
                            details={"capital": {"path": "/p/capital"}}, notes=["hello"])
    assert json.loads(json.dumps(report)) == report
    assert report["model"] == "tiny" and report["top_k"] == 2 and report["notes"] == ["hello"]
    assert report["vocab"]["size"] == len(WORDS)
    cap = report["prompts"][1]
    assert cap["name"] == "capital" and cap["path"] == "/p/capital" and cap["num_virtual_tokens"] == 3
    assert [t["nearest"][0]["text"] for t in cap["tokens"]] == ["Paris", "Madrid", "Rome"]
    assert cap["tokens"][2]["nearest"][0] == {"token": "Rome", "text": "Rome", "id": WORD_IDS["Rome"],
                                              "cosine": 1.0}
    sim = report["similarity"]
    assert sim["names"] == ["sentiment", "capital"] and sim["mean_pooled_cosine"][0][0] == 1.0
    assert sim["soft_alignment"][0][1] == sim["soft_alignment"][1][0]

    text = format_inspect(report)
    lines = text.splitlines()
    assert lines[0].startswith("model: tiny   vocabulary: 32 tokens")
    assert "prompt capital (3 virtual tokens)  /p/capital" in lines
    head = lines.index("prompt capital (3 virtual tokens)  /p/capital")
    rows = lines[head + 3:head + 7]  # header + 3 virtual tokens
    assert rows[0].split() == ["#", "NORM", "1", "cos", "2", "cos"]
    assert [r.split()[2] for r in rows[1:]] == ["'Paris'", "'Madrid'", "'Rome'"]
    # aligned: the norm and cosine columns end at the same position on each row
    ends = [[m.end() for m in re.finditer(r"-?\d\.\d{3}|cos|NORM", r)] for r in rows]
    assert all(e == ends[0] for e in ends[1:]) and len(ends[0]) == 3
    assert "similarity: cosine of mean-pooled prompts" in lines and "note: hello" in lines
    mat = lines[lines.index("similarity: cosine of mean-pooled prompts") + 1:][:3]
    assert mat[1].split()[:2] == ["sentiment", "1.000"] and mat[2].split()[2] == "1.000"


def test_single_prompt_report_has_no_similarity(model, tokenizer):
    report = inspect_report({"p": rows_of(model, ["good"])}, table(model), tokenizer, k=1)
    assert report["similarity"] is None
    assert "similarity" not in format_inspect(report)


# ----- CLI -----------------------------------------------------------------------------------------------


def run(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_inspect_parser(sub)
    ns = parser.parse_args(["inspect", *argv])
    assert ns.func(ns) == 0
    return capsys.readouterr().out


def method_of(model, words: list[str] | None = None, seed: int = 0):
    method = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "random", "seed": seed}, model,
                          make_tokenizer())
    if words is not None:
        method.embeddings.data.copy_(rows_of(model, words))
    return method


@pytest.fixture
def store(tmp_path):
    """Store with prompts sentiment (rows of KNOWN), other (random), and an ensemble both of them."""
    model = make_model("llama")  # the same weights as tiny_model_dir's model
    store = PromptStore(tmp_path / "store", create=True)
    task = {"template": "Review: {text}\nSentiment:", "target_field": "label",
            "verbalizer": {"positive": "good", "negative": "bad"}}  # an ensemble combines classification prompts
    store.save("sentiment", method_of(model, KNOWN), model, task=task)
    store.save("other", method_of(model, seed=3), model, task=task)
    store.add_ensemble("both", ["sentiment", "other"])
    return store


def test_cli_single_prompt_text_and_json(tmp_path, tiny_model_dir, capsys):
    model = make_model("llama")
    folder = save_prompt(tmp_path / "p", method_of(model, KNOWN), model)
    out = run(capsys, str(folder), "--model", str(tiny_model_dir), "--top-k", "2")
    lines = out.splitlines()
    assert lines[0].startswith(f"model: {tiny_model_dir}   vocabulary: 32 tokens")
    assert f"prompt {folder} (4 virtual tokens)  {folder}" in lines
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "NORM"])
    rows = lines[header + 1:header + 5]
    assert [r.split()[2] for r in rows] == [repr(w) for w in KNOWN]
    assert [r.split()[3] for r in rows] == ["1.000"] * 4
    assert "similarity" not in out

    report = json.loads(run(capsys, str(folder), "--model", str(tiny_model_dir), "--json"))
    (p,) = report["prompts"]
    assert p["method"] == "prompt_tuning" and p["path"] == str(folder) and report["top_k"] == 5
    assert [t["nearest"][0]["id"] for t in p["tokens"]] == [WORD_IDS[w] for w in KNOWN]
    assert all(len(t["nearest"]) == 5 for t in p["tokens"])
    assert p["norms"]["mean"] == pytest.approx(float(rows_of(model, KNOWN).norm(dim=1).mean()), abs=1e-6)


def test_cli_store_mode(store, tiny_model_dir, capsys):
    report = json.loads(run(capsys, "--store", str(store.root), "--model", str(tiny_model_dir), "--json"))
    assert [p["name"] for p in report["prompts"]] == ["other", "sentiment"]
    sentiment = report["prompts"][1]
    assert [t["nearest"][0]["text"] for t in sentiment["tokens"]] == KNOWN
    sim = report["similarity"]
    assert sim["names"] == ["other", "sentiment"]
    for m in (sim["mean_pooled_cosine"], sim["soft_alignment"]):
        assert m[0][0] == m[1][1] == 1.0 and m[0][1] == m[1][0] and m[0][1] < 0.99
    assert report["notes"] == ["both is an ensemble (mean of sentiment, other), not one prompt: its members are "
                               "inspected instead"]

    out = run(capsys, "--store", str(store.root), "--task", "sentiment", "--model", str(tiny_model_dir))
    assert "prompt sentiment (4 virtual tokens)" in out and "prompt other" not in out and "similarity" not in out

    # an ensemble named in --task stands for its members (each once)
    out = run(capsys, "--store", str(store.root), "--task", "both,sentiment", "--model", str(tiny_model_dir))
    assert out.index("prompt sentiment (") < out.index("prompt other (")
    assert out.count("prompt sentiment (") == 1
    assert "similarity: soft alignment (mean best-match token cosine, symmetrised)" in out
    assert "note: both is an ensemble (mean of sentiment, other)" in out


def test_cli_argument_errors_come_before_loading(tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")  # would fail to load: the flags are checked first
    cases = [
        ([], "give PROMPT_DIR or --store DIR"),
        ([str(tmp_path), "--store", str(tmp_path)], "not both"),
        ([str(tmp_path), "--task", "a"], "--task needs --store DIR"),
        (["--store", str(tmp_path), "--task", " , "], "give comma-separated entry names"),
        (["--store", str(tmp_path), "--top-k", "0"], "--top-k must be >= 1, got 0"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            run(capsys, *argv, "--model", missing_model)
    with pytest.raises(ConfigError, match=r"--task needs --store DIR\n  --top-k must be >= 1"):
        run(capsys, str(tmp_path), "--task", "a", "--top-k", "-1", "--model", missing_model)
    with pytest.raises(StoreError, match="not a prompt store"):
        run(capsys, "--store", str(tmp_path), "--model", missing_model)


def test_cli_store_errors(store, tmp_path, tiny_model_dir, capsys):
    with pytest.raises(StoreError, match=re.escape("no entry 'nope', 'gone' (entries: both, other, sentiment)")):
        run(capsys, "--store", str(store.root), "--task", "nope,sentiment,gone", "--model", str(tmp_path / "x"))
    empty = PromptStore(tmp_path / "empty", create=True)
    with pytest.raises(StoreError, match="no prompts to inspect"):
        run(capsys, "--store", str(empty.root), "--model", str(tiny_model_dir))


def test_cli_store_mode_leaves_out_broken_entries_with_a_note(store, tmp_path, tiny_model_dir, capsys):
    """One broken entry (or one trained on another model) made `inspect --store` exit 2 and print nothing about
    the store's other prompts. Over the whole store it is left out with a note, as `store list` lists it as
    broken and `serve` skips it (exit 0); named by --task it is still an error."""
    (store.root / "bad").mkdir()  # no files: "missing adapter_model.safetensors"
    foreign = make_model("llama", seed=1)  # same shapes, other weights: its fingerprint differs
    store.save("foreign", method_of(foreign), foreign)
    report = json.loads(run(capsys, "--store", str(store.root), "--model", str(tiny_model_dir), "--json"))
    assert [p["name"] for p in report["prompts"]] == ["other", "sentiment"]
    broken, misfit = report["notes"][1:]
    assert broken.startswith(f"bad is broken, not inspected: {store.root / 'bad'}: missing adapter_model")
    assert misfit.startswith("foreign does not fit the model, not inspected: ") and "different base model" in misfit
    out = run(capsys, "--store", str(store.root), "--model", str(tiny_model_dir))
    assert "note: bad is broken, not inspected" in out and "prompt sentiment (4 virtual tokens)" in out
    with pytest.raises(StoreError, match="missing adapter_model"):
        run(capsys, "--store", str(store.root), "--task", "bad,sentiment", "--model", str(tiny_model_dir))
    with pytest.raises(StoreError, match="trained on a different base model"):
        run(capsys, "--store", str(store.root), "--task", "foreign,sentiment", "--model", str(tiny_model_dir))
    only = PromptStore(tmp_path / "only-broken", create=True)
    (only.root / "bad").mkdir()
    with pytest.raises(StoreError, match=re.escape("no prompts to inspect (bad is broken, not inspected")):
        run(capsys, "--store", str(only.root), "--model", str(tmp_path / "no-model"))  # before the model loads


def test_cli_fingerprint_check(tmp_path, tiny_model_dir, capsys):
    other = make_model("llama", seed=1)  # same shapes, other weights
    folder = save_prompt(tmp_path / "p", method_of(other, ["good", "bad", "the", "a"]), other)
    with pytest.raises(StoreError, match="trained on a different base model"):
        run(capsys, str(folder), "--model", str(tiny_model_dir))
    report = json.loads(run(capsys, str(folder), "--model", str(tiny_model_dir), "--json", "--no-fingerprint-check"))
    assert report["prompts"][0]["num_virtual_tokens"] == 4


def test_cli_wrong_width_prompt_is_refused_clearly(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A prompt whose tensor is not in token space (e.g. future prefix tuning) gets a clear error."""
    import softprompt.store
    import softprompt.store.prompt_store

    fake = StoredPrompt(path=tmp_path / "prefix", method="prefix_tuning", method_config={},
                        tensors={"prompt_embeddings": torch.zeros(4, 2 * 2 * H)},
                        # what a prefix for the tiny llama (2 layers, 2 kv heads x 8) records: it fits the model
                        peft_config={"peft_type": "PREFIX_TUNING", "token_dim": 16, "num_layers": 2})
    for module in (softprompt.store, softprompt.store.prompt_store):
        monkeypatch.setattr(module, "load_prompt", lambda *a, **k: fake)
    with pytest.raises(StoreError, match=re.escape(f"{tmp_path / 'prefix'} is a prefix_tuning prompt (keys and "
                                                   "values in every layer, not token embeddings): not inspected")):
        run(capsys, str(tmp_path / "prefix"), "--model", str(tiny_model_dir))
    store = PromptStore(tmp_path / "store", create=True)
    (store.root / "wide").mkdir()  # in a store, a prefix prompt is skipped with a note: none is left here
    with pytest.raises(StoreError, match=re.escape("no prompts to inspect (wide is a prefix_tuning prompt")):
        run(capsys, "--store", str(store.root), "--model", str(tiny_model_dir))


def test_cli_store_mode_skips_prefix_prompts_with_a_note(tmp_path, tiny_model_dir, capsys):
    """A prefix prompt (keys and values in every layer) has no token-space embeddings: one such entry made
    `inspect --store` exit 2 and print nothing about the store's other prompts. A single one is still refused."""
    model = make_model("llama")
    store = PromptStore(tmp_path / "store", create=True)
    store.save("sentiment", method_of(model, KNOWN), model)
    prefix = build_method("prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, model, make_tokenizer())
    store.save("prefix", prefix, model)
    report = json.loads(run(capsys, "--store", str(store.root), "--model", str(tiny_model_dir), "--json"))
    assert [p["name"] for p in report["prompts"]] == ["sentiment"]
    assert [t["nearest"][0]["text"] for t in report["prompts"][0]["tokens"]] == KNOWN
    assert report["similarity"] is None
    assert report["notes"] == ["prefix is a prefix_tuning prompt (keys and values in every layer, not token "
                               "embeddings): not inspected"]
    out = run(capsys, "--store", str(store.root), "--model", str(tiny_model_dir))
    assert "prompt sentiment (4 virtual tokens)" in out
    assert "note: prefix is a prefix_tuning prompt (keys and values in every layer" in out
    with pytest.raises(StoreError, match=re.escape("no prompts to inspect (prefix is a prefix_tuning prompt")):
        run(capsys, "--store", str(store.root), "--task", "prefix", "--model", str(tiny_model_dir))
    with pytest.raises(StoreError, match="is a prefix_tuning prompt .*not inspected; inspect shows prompts of "
                                         r"embeddings \(prompt_tuning, p_tuning\)"):
        run(capsys, str(store.path("prefix")), "--model", str(tiny_model_dir))


@pytest.mark.parametrize("method", ["prefix_tuning", "deep_prompt"])
def test_cli_single_prefix_prompt_whose_rows_have_the_hidden_width_is_refused_before_the_model_loads(
        tmp_path, capsys, method):
    """One layer and key/value width H/2: the prefix's rows (1 layer x 2 x 16) are H = 32 wide, and a single
    PROMPT_DIR of it was inspected as token embeddings (keys and values read as nearest vocabulary tokens);
    store mode already skipped it. Refused, naming the method, before the model loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from softprompt.model import prepare_frozen

    torch.manual_seed(0)
    one = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       pad_token_id=0, bos_token_id=None, eos_token_id=1))
    prepare_frozen(one)
    one.save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    folder = save_prompt(tmp_path / "p", build_method(method, {"num_virtual_tokens": 3, "init": "random"}, one,
                                                      make_tokenizer()), one)
    for model_dir in (tmp_path / "model", tmp_path / "no-model"):  # no model is needed to refuse it
        with pytest.raises(StoreError, match=re.escape(f"{folder} is a {method} prompt (keys and values in every "
                                                       "layer, not token embeddings): not inspected")):
            run(capsys, str(folder), "--model", str(model_dir))


def test_cli_default_model_is_the_embedded_alias(tmp_path, capsys, monkeypatch, model):
    import softprompt.model

    seen = []

    def fake_load(name, device, dtype, task_type="auto"):
        seen.append((name, device, dtype, task_type))
        raise softprompt.model.ModelLoadError("stop here")

    folder = save_prompt(tmp_path / "p", method_of(model), model)  # read first: the task type comes from it
    monkeypatch.setattr(softprompt.model, "load_base_model", fake_load)
    with pytest.raises(softprompt.model.ModelLoadError, match="stop here"):
        run(capsys, str(folder))
    assert seen == [(softprompt.model.DEFAULT_MODEL, "auto", "auto", "auto")]
