"""``--objective lm``: plain-text corpora (documents, held-out split, chunks), training and the perplexity report."""

from __future__ import annotations

import json
import random

import pytest

from softprompt.config import ConfigError, DataArgs, fit_max_length
from softprompt.data import DataError, collate
from softprompt.data.corpus import (
    BUILTIN_CORPORA,
    builtin_corpus,
    encode_corpus,
    held_out_split,
    load_corpus,
    read_documents,
)
from tests.conftest import make_tokenizer
from tests.test_cli import run

# words of the tiny vocabulary (tests/conftest.py WORDS); unknown words would all become [UNK]
WORDS = ["the", "movie", "film", "plot", "was", "is", "very", "not", "good", "bad", "great", "awful", "a", "."]
ROWS = ["base model (no prompt)", "init text as hard prompt", "tuned soft prompt"]


def corpus_docs(n: int, seed: int = 0) -> list[str]:
    """Documents in one learnable style: short, repetitive sentences over the tiny vocabulary."""
    rng = random.Random(seed)
    sentences = ["the movie was very good .", "the film is not bad .", "a plot was great ."]
    return ["\n".join(rng.choice(sentences) for _ in range(rng.randint(2, 5))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_every_token_after_the_first_of_a_chunk_is_a_target(tok):
    doc = " ".join(WORDS * 3)  # 42 tokens
    ids = tok(doc, add_special_tokens=False)["input_ids"]
    enc = encode_corpus(tok, [doc, "the", "the movie"], max_length=10)
    chunks = enc[:-1]
    assert [len(e.input_ids) for e in chunks] == [10, 10, 10, 10, 6]  # stride 9: 0, 9, 18, 27, 36
    assert all(e.target_start == 1 for e in enc)
    assert enc[-1].input_ids == tok("the movie", add_special_tokens=False)["input_ids"]  # one token: no chunk
    batch = collate(enc, tok.pad_token_id)
    for row, e in enumerate(enc):
        n = len(e.input_ids)
        assert batch.target_mask[row].tolist() == [False] + [True] * (n - 1) + [False] * (10 - n)
    # consecutive chunks share one token, so every token of the document but its first is scored exactly once
    scored = [t for e in chunks for t in e.input_ids[e.target_start:]]
    assert scored == ids[1:]
    assert [e.input_ids[0] for e in chunks[1:]] == [c.input_ids[-1] for c in chunks[:-1]]


def test_chunks_and_prompt_fit_the_context(tok):
    # the tiny llama has 256 positions: a 200-token prompt leaves 56 for text; the default --max-length
    # (256) is lowered to that, a given one that does not fit is refused
    context, p = (256, "max_position_embeddings"), 200
    length = fit_max_length(context, "--model tiny", p, 256, given=False)
    assert length == 56
    enc = encode_corpus(tok, [" ".join(WORDS * 20)], max_length=length)
    assert len(enc) > 3 and max(len(e.input_ids) for e in enc) == 56
    assert all(p + len(e.input_ids) <= 256 for e in enc)
    with pytest.raises(ConfigError, match="lower --max-length to 56"):
        fit_max_length(context, "--model tiny", p, 64, given=True)
    with pytest.raises(DataError, match="--max-length must be >= 2"):
        encode_corpus(tok, ["the movie"], max_length=1)


def test_documents_of_text_and_record_files(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first line\nsecond line\n\n  \n\nsecond doc\r\n\r\nthird\n")
    assert read_documents(txt) == ["first line\nsecond line", "second doc", "third"]
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"body": "doc one"}) + "\n" + json.dumps({"body": " doc two "}) + "\n")
    assert read_documents(jl, "body") == ["doc one", "doc two"]
    with pytest.raises(DataError, match="--text-field FIELD"):
        read_documents(jl)
    jl.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"other": "y"}) + "\n" + json.dumps({"body": 3}))
    with pytest.raises(DataError, match=r"2 of 3 records have no text in field 'body'.*line 2, line 3"):
        read_documents(jl, "body")
    with pytest.raises(DataError, match="leave --text-field out"):
        read_documents(txt, "body")


def test_a_corpus_file_of_an_unknown_extension_is_refused(tmp_path):
    # docs.ndjson was read as plain text: the prompt trained on JSON syntax
    nd = tmp_path / "docs.ndjson"
    nd.write_text(json.dumps({"text": "a document"}) + "\n")
    with pytest.raises(DataError, match=r"docs\.ndjson: --objective lm does not read '\.ndjson' files; accepted: "
                                        r"\.txt, \.text, \.md \(plain text\) and \.jsonl, \.json, \.csv, \.tsv"):
        read_documents(nd)
    with pytest.raises(ConfigError, match=r"--train-file docs\.ndjson: --objective lm does not read"):
        DataArgs(objective="lm", train_file=str(nd))
    md = tmp_path / "notes.md"
    md.write_text("one\n\ntwo")
    assert read_documents(md) == ["one", "two"]


def test_held_out_split_is_by_document_and_deterministic(tmp_path):
    docs = corpus_docs(50)
    docs = [f"{i} {d}" for i, d in enumerate(docs)]  # distinct documents
    a = held_out_split(docs, ("validation", "test"), seed=13)
    assert a == held_out_split(docs, ("validation", "test"), seed=13)
    assert {k: len(v) for k, v in a.items()} == {"validation": 5, "test": 5, "train": 40}
    assert sorted(a["train"] + a["validation"] + a["test"]) == sorted(docs)  # whole documents, each once
    assert a["train"] == [d for d in docs if d in set(a["train"])]  # corpus order kept
    b = held_out_split(docs, ("validation", "test"), seed=14)
    assert b["test"] != a["test"]
    with pytest.raises(DataError, match="too few to hold out"):
        held_out_split(docs[:2], ("validation", "test"), seed=13)
    # through load_corpus: a given --test-file is used as is, only the validation split is held out
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    (tmp_path / "t.txt").write_text("the movie\n\nthe film")
    task = load_corpus(train_file=tmp_path / "c.txt", test_file=tmp_path / "t.txt", seed=13)
    assert [e.target for e in task.splits["test"]] == ["the movie", "the film"]
    assert len(task.splits["validation"]) == 5 and len(task.splits["train"]) == 45
    assert all(e.source == "" for e in task.splits["train"])
    assert "validation: 5 documents each held out" in task.format.note and "--data-seed 13" in task.format.note


def test_builtin_corpus_hamlet():
    docs = builtin_corpus("hamlet")
    assert list(BUILTIN_CORPORA) == ["hamlet"]
    assert len(docs) == 211 and docs[0].startswith("The Tragedy of Hamlet, Prince of Denmark\nACT I")
    assert not any("homepage" in d for d in docs)
    task = load_corpus(dataset="hamlet", seed=13)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 169, "validation": 21, "test": 21}


@pytest.mark.parametrize(("argv", "message"), [
    (["--verbalizer", "a=b"], "--verbalizer does not apply to --objective lm"),
    (["--template", "x {y}", "--target-field", "z"], "--template does not apply to --objective lm"),
    (["--dataset", "rotten_tomatoes"], "--dataset rotten_tomatoes is not a built-in text corpus (a task dataset"),
    (["--train-file", "{jsonl}"], "holds records: name the field with the text, --text-field FIELD"),
    (["--metric", "accuracy", "--train-file", "{txt}"], "--metric accuracy does not apply to --objective lm"),
])
def test_lm_flags_are_checked(tmp_path, tiny_model_dir, argv, message):
    (tmp_path / "c.jsonl").write_text('{"text": "the movie"}\n')
    (tmp_path / "c.txt").write_text("\n\n".join(corpus_docs(20)))
    argv = [a.replace("{jsonl}", str(tmp_path / "c.jsonl")).replace("{txt}", str(tmp_path / "c.txt")) for a in argv]
    rc, _, err = run(["train", "--objective", "lm", *argv, "--output-dir", tmp_path / "run",
                      "--model", tiny_model_dir])
    assert rc == 2 and message in err, err


def test_objective_flag_values():
    with pytest.raises(ConfigError, match="--objective must be one of task, lm, got 'mlm'"):
        DataArgs(objective="mlm")
    with pytest.raises(ConfigError, match="--dataset hamlet is a text corpus: add --objective lm"):
        DataArgs(dataset="hamlet")
    with pytest.raises(ConfigError, match="--text-field names the text of an --objective lm corpus"):
        DataArgs(text_field="body")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A short LM run on a tiny model over a jsonl corpus (validation/test held out); returns (dir, stdout, env)."""
    from tests.conftest import make_model

    d = tmp_path_factory.mktemp("lm")
    make_model("llama").save_pretrained(d / "tiny")
    make_tokenizer().save_pretrained(d / "tiny")
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "body": doc}) + "\n" for i, doc in enumerate(corpus_docs(60))))
    out = d / "run"
    rc, stdout, err = run(["train", "--model", d / "tiny", "--objective", "lm", "--train-file", corpus,
                           "--text-field", "body", "--max-length", "24", "--num-virtual-tokens", "4",
                           "--batch-size", "8", "--max-steps", "16", "--eval-every", "8", "--lr", "0.3",
                           "--warmup-steps", "2", "--init-text", "the movie", "--output-dir", out])
    assert rc == 0, err
    return out, stdout, d


def test_training_lowers_held_out_perplexity_and_reports_it(lm_run):
    out, stdout, _ = lm_run
    assert "train=48  validation=6  test=6 documents; validation and test: 6 documents each held out" in stdout
    assert "test split (6 documents):" in stdout
    for row in ROWS:
        assert row in stdout
    report = json.loads((out / "eval.json").read_text())
    assert list(report) == ROWS  # no k-shot row: it has no meaning for plain text
    assert {"loss", "perplexity", "tokens", "n"} <= set(report["tuned soft prompt"])
    # the same tokens are scored in every condition, so the perplexities are comparable
    assert len({m["tokens"] for m in report.values()}) == 1 and report["base model (no prompt)"]["n"] == 6
    # the prompt starts as the init text's embeddings: the hard-prompt row is where training started (a tiny
    # random model leaves little to gain: ~64 -> ~60 here, deterministic under the fixed seeds)
    tuned = report["tuned soft prompt"]["perplexity"]
    assert tuned < 0.95 * report["init text as hard prompt"]["perplexity"]
    assert tuned < 0.95 * report["base model (no prompt)"]["perplexity"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "val_perplexity" in rows[7] and "val_accuracy" not in rows[7] and "val_exact_match" not in rows[7]


def test_stored_lm_prompt_records_the_corpus_and_eval_repeats_the_report(lm_run, tmp_path):
    out, _, d = lm_run
    task = json.loads((out / "prompt" / "softprompt.json").read_text())["task"]
    assert task["objective"] == "lm" and task["text_field"] == "body" and task["template"] is None
    assert task["chunking"]["max_length"] == 24 and task["chunking"]["stride"] == 23
    assert task["corpus"]["train_file"] == str(d / "corpus.jsonl") and task["corpus"]["data_seed"] == 13
    # no data flags: the recorded corpus, split seed and chunk length give the training run's test report
    rc, stdout, err = run(["eval", "--model", d / "tiny", "--prompt", out / "prompt", "--report", tmp_path / "r.json"])
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads((out / "eval.json").read_text())
    assert "tuned soft prompt" in stdout and "perplexity" in stdout
    # a --max-length given is kept (the recorded one replaced it, and the log invited to override it):
    # shorter windows score the same tokens (windows overlap by one), each with less context before it
    rc, _, err = run(["eval", "--model", d / "tiny", "--prompt", out / "prompt", "--max-length", "12",
                      "--report", tmp_path / "short.json"])
    assert rc == 0, err
    short = json.loads((tmp_path / "short.json").read_text())["tuned soft prompt"]
    own = json.loads((out / "eval.json").read_text())["tuned soft prompt"]
    assert short["n"] == own["n"] and short["tokens"] == own["tokens"]
    assert short["perplexity"] != pytest.approx(own["perplexity"], rel=1e-4)


def test_store_evaluation_reports_an_lm_prompts_perplexity(lm_run, tmp_path):
    out, _, d = lm_run
    store = tmp_path / "store"
    for name in ("corpus_a", "corpus_b"):
        assert run(["store", "add", "--store", store, name, out / "prompt"])[0] == 0
    rc, _, err = run(["eval", "--model", d / "tiny", "--store", store, "--report", tmp_path / "r.json"])
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    # each lm entry is scored on its recorded corpus, split and chunks: the training run's own test report
    own = json.loads((out / "eval.json").read_text())["tuned soft prompt"]
    assert set(report) == {"corpus_a", "corpus_b"}
    for name in ("corpus_a", "corpus_b"):
        assert report[name]["tokens"] == own["tokens"] and report[name]["n"] == own["n"]
        assert report[name]["perplexity"] == pytest.approx(own["perplexity"], rel=1e-5)
    # lm prompts have no labels to combine: no ensemble of them
    rc, _, err = run(["ensemble", "--store", store, "--name", "corpus_ens", "--members", "corpus_a,corpus_b"])
    assert rc == 2 and "member 'corpus_a' has no labels" in err


def test_an_lm_hard_prompt_that_would_pass_the_context_is_skipped_with_a_note(tmp_path, caplog):
    """P + --max-length fits the context, but the init text as a hard prompt is longer than P: GPT-2's learned
    positions raised IndexError at the end of training (before prompt/ was saved); RoPE models ran silently
    past their context."""
    import torch

    from softprompt.config import EvalArgs
    from softprompt.forward import compute_prompt_kv
    from softprompt.workflows.baselines import lm_baselines
    from tests.conftest import make_model

    model, tok = make_model("gpt2"), make_tokenizer()  # 256 positions
    (tmp_path / "docs.txt").write_text("\n\n".join(corpus_docs(12)))
    data = load_corpus(train_file=tmp_path / "docs.txt")
    long_doc = " ".join(["the movie was very good ."] * 60)  # ~360 tokens: chunks of the full --max-length
    examples = [type(data.examples("test")[0])("", long_doc)]
    torch.manual_seed(0)
    kv = compute_prompt_kv(model, torch.randn(2, model.config.n_embd) * 0.1)
    hint = "Classify the sentiment of the movie review ."
    for max_length, rows in ((254, ["base model (no prompt)", "tuned soft prompt"]), (200, ROWS)):
        args = {"eval": EvalArgs(eval_batch_size=4), "data": DataArgs(objective="lm", max_length=max_length)}
        with caplog.at_level("WARNING"):
            report = lm_baselines(model, tok, args, hint, examples, kv, data.format)
        assert list(report) == rows
    assert "that row is skipped" in caplog.text
