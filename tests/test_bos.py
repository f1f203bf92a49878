"""Where a causal LM's BOS goes: [prompt, BOS, text] as PEFT lays it out, [BOS, text] without a prompt,
[BOS, hard prompt, text] for hard prompts; once only; kept by truncation; old stored prompts keep their layout.

Two tokenizers over the same words: ``bos_tok`` adds ``[BOS]`` in front of every text (as Llama, Gemma and
Mistral tokenizers do, through a post-processor; its ``add_bos_token`` says False), ``tokenizer`` adds
nothing (GPT-2, SmolLM2, Qwen2): with it every id stays what it was before the BOS was handled.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from softprompt.config import DataArgs, EvalArgs, TrainArgs
from softprompt.data import DataError, Example, TaskData, TaskFormat, collate, encode, leading_special_ids
from softprompt.engine import ClassifyRequest, Engine, GenerateRequest, ScoreRequest, TooLongError
from softprompt.evaluate import evaluate_prompt, hard_prompt_kv, label_scores
from softprompt.forward import compute_prompt_kv, family_of
from softprompt.forward.causal import CausalLM
from softprompt.methods import build_method
from softprompt.store import META_NAME, PromptStore, StoreError, import_peft, load_prompt, save_prompt
from softprompt.train import train
from tests.conftest import WORD_IDS, make_model, make_tokenizer, sentiment_records, text_logits

BOS = len(WORD_IDS)  # 32, inside the tiny models' vocabulary of 64
FMT = TaskFormat("Review: {text}\nSentiment:", "label", {"positive": "positive", "negative": "negative"})
TASK = {"template": FMT.template, "target_field": "label", "verbalizer": FMT.verbalizer}
P = 4


def word_tokenizer(single: str | None = None, specials: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The conftest word-level tokenizer, plus ``specials`` and a post-processor template ``single``."""
    ids = dict(WORD_IDS)
    for s in specials:
        ids.setdefault(s, len(ids))
    inner = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    if single is not None:
        inner.post_processor = processors.TemplateProcessing(single=single,
                                                             special_tokens=[(s, ids[s]) for s in specials])
    kw = {"bos_token": "[BOS]"} if "[BOS]" in specials else {}
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]",
                                   **kw)


@pytest.fixture(scope="module")
def bos_tok():
    return word_tokenizer("[BOS] $A", ("[BOS]",))


def plain(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def examples(n: int = 6) -> list[Example]:
    return [FMT.render(r) for r in sentiment_records(n)]


def soft_prompt(model, tok, seed: int = 0):
    torch.manual_seed(seed)
    return build_method("prompt_tuning", {"num_virtual_tokens": P, "init": "random", "init_scale": 1.0}, model, tok)


def test_leading_special_ids_compares_tokenisations(bos_tok):
    assert bos_tok("good")["input_ids"] == [BOS, WORD_IDS["good"]] and not getattr(bos_tok, "add_bos_token", False)
    assert leading_special_ids(bos_tok) == [BOS]
    assert leading_special_ids(make_tokenizer()) == []  # adds nothing (GPT-2, SmolLM2, Qwen2)
    # an encoder's [CLS] text [SEP]: only what comes before the text; T5's text EOS: nothing
    cls = word_tokenizer("[CLS] $A [SEP]", ("[CLS]", "[SEP]"))
    assert leading_special_ids(cls) == [cls.convert_tokens_to_ids("[CLS]")]
    t5_like = word_tokenizer("$A [EOS]", ("[EOS]",))
    assert t5_like("good")["input_ids"] == [WORD_IDS["good"], WORD_IDS["[EOS]"]] and leading_special_ids(t5_like) == []
    # the causal family puts them in front of the text; the others keep their layouts
    assert family_of(make_model("llama")).lead_ids(bos_tok) == [BOS]
    assert family_of(make_model("llama")).lead_ids(bos_tok, bos=False) == []


def test_training_batch_starts_with_bos_right_after_the_prompt(bos_tok, tokenizer, monkeypatch, tmp_path):
    """train() feeds [BOS, source, target] after the prompt; targets get no special tokens; no BOS: unchanged."""
    data = TaskData(FMT, {"train": examples(8)})
    seen: list = []
    real = CausalLM.loss

    def loss(self, model, batch, prompt):
        seen.append(batch)
        return real(self, model, batch, prompt)

    monkeypatch.setattr(CausalLM, "loss", loss)
    for name, tok, lead in [("bos", bos_tok, [BOS]), ("plain", tokenizer, [])]:
        model = make_model("llama")
        seen.clear()
        train(model, tok, soft_prompt(model, tok), data,
              TrainArgs(output_dir=str(tmp_path / name), max_steps=1, batch_size=8, seed=3, checkpoint_every=10))
        (batch,) = seen
        rows = {tuple(r[m.bool()].tolist()) for r, m in zip(batch.input_ids, batch.attention_mask, strict=True)}
        assert rows == {tuple(lead + plain(tok, ex.source) + plain(tok, ex.target)) for ex in data.examples("train")}
        assert all(int(m.sum()) == 1 for m in batch.target_mask)  # the label word alone is the target


def test_engine_rows_start_with_bos(bos_tok, tokenizer):
    """Classify, score and generate rows: [BOS, text] after a soft prompt and with no prompt; a hard prompt's
    text gets none (the hard prompt starts with it); a tokenizer without BOS gives the ids of before."""
    model = make_model("llama")
    text, rendered = "the movie was great", "Review: the movie was great\nSentiment:"
    for tok, lead in [(bos_tok, [BOS]), (tokenizer, [])]:
        engine = Engine(model, tok)
        kv = compute_prompt_kv(model, soft_prompt(model, tok)())
        engine.add_kv("soft", kv, FMT)
        engine.add_base("base", FMT)
        engine.add_kv("hard", hard_prompt_kv(model, tok, "Classify sentiment ."), FMT, bos=False)
        for task, expected in [("soft", lead), ("base", lead), ("hard", [])]:
            src = expected + plain(tok, rendered)
            (row,) = engine.prepare("classify", ClassifyRequest(task, text)).rows
            assert row.ids == src and row.candidates == [WORD_IDS["positive"], WORD_IDS["negative"]]
            (row,) = engine.prepare("score", ScoreRequest(task, text, " positive")).rows
            assert row.ids == src + [WORD_IDS["positive"]] and row.target_start == len(src)
            (row,) = engine.prepare("generate", GenerateRequest(task, text, max_tokens=2)).rows
            assert row.ids == src
    assert hard_prompt_kv(model, bos_tok, "Classify").length == 2  # [BOS, Classify]
    assert hard_prompt_kv(model, bos_tok, "Classify", bos=False).length == 1


def test_text_already_starting_with_bos_gets_no_second_one(bos_tok):
    """A chat template's rendered BOS (Llama-3's <|begin_of_text|>, Gemma's <bos>) is found on the token ids."""
    tok = word_tokenizer("[BOS] $A", ("[BOS]",))
    tok.chat_template = "[BOS]{% for m in messages %}{{ m['content'] }} {% endfor %}"
    chat = tok.apply_chat_template([{"role": "user", "content": "good movie"}], tokenize=False)
    assert chat.startswith("[BOS]") and plain(tok, chat) == [BOS, WORD_IDS["good"], WORD_IDS["movie"]]
    model = make_model("llama")
    engine = Engine(model, tok)
    engine.add_base("base")
    engine.add_kv("soft", compute_prompt_kv(model, soft_prompt(model, tok)()))
    for task in ("base", "soft"):
        (row,) = engine.prepare("generate", GenerateRequest(task, chat, raw=True, max_tokens=2)).rows
        assert row.ids == [BOS, WORD_IDS["good"], WORD_IDS["movie"]]
    (enc,) = encode(tok, [Example("[BOS] Review: good", " positive")], lead=[BOS])
    assert enc.input_ids == [BOS] + plain(tok, "Review: good positive")


def test_left_truncation_keeps_bos_and_counts_it(bos_tok):
    long = Example("Review: the movie was very good\nSentiment:", " positive")
    (enc,) = encode(bos_tok, [long], max_length=4, lead=[BOS])
    assert enc.input_ids == [BOS] + plain(bos_tok, "Sentiment : positive") and enc.target_start == 3
    (enc,) = encode(bos_tok, [long], max_length=2, lead=[BOS])
    assert enc.input_ids == [BOS, WORD_IDS["positive"]]
    with pytest.raises(DataError, match="leading special"):  # the target and the BOS do not fit
        encode(bos_tok, [long], max_length=1, lead=[BOS])
    assert encode(bos_tok, [long], max_length=1)[0].input_ids == [WORD_IDS["positive"]]  # no lead: as before
    model = make_model("llama")
    engine = Engine(model, bos_tok, max_input_tokens=4, truncate=True)
    engine.add_kv("soft", compute_prompt_kv(model, soft_prompt(model, bos_tok)()), FMT)
    tail = plain(bos_tok, "very good\nSentiment:")
    # an engine with max_input_tokens = --max-length reads what training read: the source cut so that it and
    # the longest label (the continuation) fit in it (it read one more token of a long input than training)
    (trained,) = encode(bos_tok, [long], max_length=4, lead=[BOS])
    (row,) = engine.prepare("classify", ClassifyRequest("soft", "the movie was very good")).rows
    assert row.ids == trained.input_ids[:trained.target_start] == [BOS] + tail[-2:]
    (row,) = engine.prepare("score", ScoreRequest("soft", "the movie was very good", " positive")).rows
    assert row.ids == trained.input_ids == [BOS] + tail[-2:] + [WORD_IDS["positive"]]
    # generation too (the final report of a generation task with a test input over --max-length raised
    # TooLongError after training, before the prompt was saved); a server's engine does not truncate
    (row,) = engine.prepare("generate", GenerateRequest("soft", "the movie was very good", max_tokens=2)).rows
    assert row.ids == [BOS] + tail[-3:]
    engine.truncate = False
    with pytest.raises(TooLongError, match="generate input for task 'soft' has 10 tokens; at most 4 fit"):
        engine.prepare("generate", GenerateRequest("soft", "the movie was very good", max_tokens=2))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_ours_equals_peft_prompt_tuning_with_a_bos_tokenizer(bos_tok, tmp_path):
    """PEFT is fed what its users feed it, ``tok(source) + tok(target)`` with special tokens: [prompt, BOS, ...].
    Our training batch, loss, text logits and engine label scores for the same prompt must equal PEFT's."""
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(make_model("llama"), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init="RANDOM"))
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    model = make_model("llama")
    stored = load_prompt(tmp_path / "peft", model)
    assert stored.bos  # a PEFT folder was trained on [prompt, BOS, text]
    method = stored.build_method()
    family = family_of(model)
    engine = Engine(model, bos_tok)
    engine.add_prompt("peft", stored)
    exs = examples(4)
    batch = collate(family.encode_examples(bos_tok, exs, FMT, 256), bos_tok.pad_token_id)
    for i, ex in enumerate(exs):
        src = bos_tok(ex.source)["input_ids"]  # with special tokens, as a PEFT user tokenises
        ids = torch.tensor([src + plain(bos_tok, ex.target)])  # (1, T)
        assert batch.input_ids[i, :ids.shape[1]].tolist() == ids[0].tolist()
        labels = torch.full_like(ids, -100)
        labels[0, len(src):] = ids[0, len(src):]
        with torch.no_grad():
            out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
            ours = text_logits(model, ids, torch.ones_like(ids), compute_prompt_kv(model, method()))
            row = collate([family.encode_examples(bos_tok, [ex], FMT, 256)[0]], bos_tok.pad_token_id)
            loss = family.loss(model, row, family.step_prompt(model, method(), "shared_kv"))
        torch.testing.assert_close(ours, out.logits[:, P:].float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(loss, out.loss.float(), atol=1e-5, rtol=1e-4)
        # the engine serving the PEFT folder scores the target with PEFT's log-probabilities
        (res,) = engine.score([ScoreRequest("peft", ex.source, ex.target, raw=True)])
        with torch.no_grad():
            lp = torch.log_softmax(peft_model(input_ids=torch.tensor([src])).logits[0, -1].float(), -1)
        assert res.logprob == pytest.approx(float(lp[ids[0, -1]]), abs=1e-4)


def test_hard_prompt_and_no_prompt_layouts(bos_tok):
    """[BOS, hard prompt, text] is the no-prompt layout of the two texts joined; a soft prompt's text starts
    with BOS; evaluate_with_baselines lays each condition out so (engine path, served families)."""
    from softprompt.workflows.baselines import evaluate_with_baselines

    model = make_model("llama")
    hard_text = "Classify sentiment ."
    exs = examples(6)
    joined = [Example(hard_text + "\n" + ex.source, ex.target, ex.label) for ex in exs]
    hard = hard_prompt_kv(model, bos_tok, hard_text + "\n")
    after_hard = label_scores(model, bos_tok, hard, exs, FMT, 4, bos=False)
    torch.testing.assert_close(after_hard, label_scores(model, bos_tok, None, joined, FMT, 4), atol=1e-5, rtol=1e-4)
    kv = compute_prompt_kv(model, soft_prompt(model, bos_tok)())
    args = {"eval": SimpleNamespace(baselines=["no_prompt", "hard_prompt"], eval_batch_size=4, k_shot=2,
                                    max_new_tokens=3),
            "data": SimpleNamespace(max_length=64, data_seed=0)}
    data = TaskData(FMT, {"test": exs})
    for tuned_bos in (True, False):
        report = evaluate_with_baselines(model, bos_tok, data, args, hard_text, exs, kv, tuned_bos=tuned_bos)
        expected = {"no soft prompt (template only)": evaluate_prompt(model, bos_tok, None, exs, FMT)[0],
                    "init text as hard prompt": evaluate_prompt(model, bos_tok, None, joined, FMT)[0],
                    "tuned soft prompt": evaluate_prompt(model, bos_tok, kv, exs, FMT, bos=tuned_bos)[0]}
        assert list(report) == list(expected)
        for name, metrics in expected.items():
            assert report[name] == pytest.approx(metrics, rel=1e-4, abs=1e-5), name
    assert evaluate_prompt(model, bos_tok, kv, exs, FMT, bos=False)[0]["loss"] != pytest.approx(
        evaluate_prompt(model, bos_tok, kv, exs, FMT)[0]["loss"], abs=1e-5)  # the BOS changes what it reads


def test_engine_equals_single_evaluation_with_bos(bos_tok):
    """The engine (prepare.py) and evaluate_prompt (data/tokenize.py) put the BOS in the same places."""
    from softprompt.evaluate import evaluate_on_engine

    model = make_model("llama")
    gen = TaskFormat("Country: {country}\nCapital:", "capital")
    tuned = compute_prompt_kv(model, soft_prompt(model, bos_tok)())
    hard = hard_prompt_kv(model, bos_tok, "Classify sentiment .")
    for fmt, exs in [(FMT, examples(5)), (gen, [gen.render({"country": c, "capital": k})
                                                for c, k in [("France", "Paris"), ("Spain", "Madrid")]])]:
        engine = Engine(model, bos_tok, max_batch_rows=3)
        engine.add_base("none", fmt)
        engine.add_kv("tuned", tuned, fmt)
        engine.add_kv("old", tuned, fmt, bos=False)
        engine.add_kv("hard", hard, fmt, bos=False)
        report = evaluate_on_engine(engine, {t: t for t in ("none", "tuned", "old", "hard")}, exs, fmt, 3)
        for task, kv, bos in [("none", None, True), ("tuned", tuned, True), ("old", tuned, False),
                              ("hard", hard, False)]:
            single, _ = evaluate_prompt(model, bos_tok, kv, exs, fmt, batch_size=2, max_new_tokens=3, bos=bos)
            assert report[task] == pytest.approx(single, rel=1e-4, abs=1e-5), task


def test_generation_inputs_start_with_bos(bos_tok, monkeypatch):
    """evaluate.generate_texts decodes after the same [BOS, source] rows as the engine's generate requests."""
    import softprompt.evaluate as evaluate

    model = make_model("llama")
    sources = ["Country: France\nCapital:", "Country: Spain\nCapital:"]
    engine = Engine(model, bos_tok)
    engine.add_base("base")
    engine.add_kv("old", compute_prompt_kv(model, soft_prompt(model, bos_tok)()), bos=False)
    fed = []
    real = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda m, ids, mask, *a, **k: fed.append(
        [r[b.bool()].tolist() for r, b in zip(ids, mask, strict=True)]) or real(m, ids, mask, *a, **k))
    for task, bos in [("base", True), ("old", False)]:
        fed.clear()
        evaluate.generate_texts(model, bos_tok, None, sources, 2, 8, bos=bos)
        rows = [engine.prepare("generate", GenerateRequest(task, s, raw=True, max_tokens=2)).rows[0].ids
                for s in sources]
        assert fed == [rows] and all((r[0] == BOS) == bos for r in rows)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_stored_flag_keeps_each_prompts_layout(bos_tok, tmp_path, monkeypatch):
    """New prompts record "bos": true; one written before the flag (no "bos") keeps its no-BOS layout in the
    engine and in `softprompt eval`; a PEFT folder is read with the BOS; re-saving keeps the layout."""
    model = make_model("llama")
    save_prompt(tmp_path / "new", soft_prompt(model, bos_tok), model, task=TASK)
    meta = json.loads((tmp_path / "new" / META_NAME).read_text())
    assert meta["bos"] is True and load_prompt(tmp_path / "new").bos
    old = tmp_path / "old"
    save_prompt(old, soft_prompt(model, bos_tok), model, task=TASK)
    meta = json.loads((old / META_NAME).read_text())
    del meta["bos"], meta["specials"]  # what softprompt wrote before it put the BOS after the prompt
    (old / META_NAME).write_text(json.dumps(meta))
    assert not load_prompt(old).bos
    engine = Engine(model, bos_tok)
    engine.add_prompt("new", load_prompt(tmp_path / "new", model))
    engine.add_prompt("old", load_prompt(old, model))
    store = PromptStore(tmp_path / "store", create=True)
    store.add("old", old)
    engine.load_from_store(store, "old")
    engine.add_ensemble("both", ["new", "old"])
    text = plain(bos_tok, "Review: good\nSentiment:")
    assert [r.ids for r in engine.prepare("classify", ClassifyRequest("new", "good")).rows] == [[BOS] + text]
    assert [r.ids for r in engine.prepare("classify", ClassifyRequest("old", "good")).rows] == [text]
    assert [r.ids for r in engine.prepare("classify", ClassifyRequest("both", "good")).rows] == [[BOS] + text, text]
    assert store.show("old")["bos"] is False
    # re-saving (import, tune's copies) keeps the layout; a PEFT folder imports as trained with the BOS
    import_peft(old, tmp_path / "old2", model)
    assert json.loads((tmp_path / "old2" / META_NAME).read_text())["bos"] is False
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(make_model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    pm.save_pretrained(tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "imported", model)
    assert json.loads((tmp_path / "imported" / META_NAME).read_text())["bos"] is True
    # `softprompt eval --prompt DIR` evaluates the tuned prompt with its stored layout
    import softprompt.workflows.evaluation as evaluation

    seen = []
    monkeypatch.setattr(evaluation, "load_model_from_args", lambda args, stored: (model, bos_tok))
    monkeypatch.setattr(evaluation, "load_task_from_args", lambda *a, **k: TaskData(FMT, {"test": examples(2)}))
    monkeypatch.setattr(evaluation, "evaluate_with_baselines", lambda *a: seen.append(a[-1]) or {})
    data = DataArgs(dataset="rotten_tomatoes")  # these prompts record no dataset: eval needs a data flag
    for folder in (old, tmp_path / "new"):
        evaluation.evaluate_stored_prompt({"eval": EvalArgs(), "data": data}, str(folder))
    assert seen == [False, True]
    meta["bos"] = "yes"
    (old / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="'bos' must be true or false"):
        load_prompt(old)


def test_an_lm_prompt_records_its_layout_and_the_base_model_reads_after_its_bos(bos_tok, tmp_path):
    """A corpus chunk is trained right after the prompt ([P, text]): the stored prompt says bos false, so the
    engine (generate, serve) feeds it that way; the base-model row reads [BOS, text], as in pre-training."""
    from softprompt.cli import main
    from softprompt.data.corpus import load_corpus
    from softprompt.evaluate import lead_prompt_kv

    d = tmp_path / "m"
    make_model("llama").save_pretrained(d)
    bos_tok.save_pretrained(d)
    sentences = ["the movie was very good .", "the film is not bad .", "a plot was great ."]
    (tmp_path / "c.txt").write_text("\n\n".join(" ".join(sentences[(i + j) % 3] for j in range(3)) for i in range(30)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(d), "--objective", "lm", "--train-file", str(tmp_path / "c.txt"),
                 "--max-length", "16", "--num-virtual-tokens", "2", "--init", "random", "--batch-size", "4",
                 "--max-steps", "2", "--eval-every", "2", "--baselines", "no_prompt", "--output-dir", str(out)]) == 0
    stored = load_prompt(out / "prompt")
    assert stored.bos is False and load_prompt(out / "best").bos is False
    model = make_model("llama")
    engine = Engine(model, bos_tok)
    engine.add_prompt("lm", stored)
    (row,) = engine.prepare("generate", GenerateRequest("lm", "the movie", raw=True)).rows
    assert row.ids == plain(bos_tok, "the movie")  # [P, text], as trained: no BOS after the prompt
    task = load_corpus(None, str(tmp_path / "c.txt"), None, None, None, {"validation": 300}, 13)
    test = task.examples("test")
    base = json.loads((out / "eval.json").read_text())["base model (no prompt)"]
    with_bos = evaluate_prompt(model, bos_tok, lead_prompt_kv(model, bos_tok), test, task.format, max_length=16)[0]
    without = evaluate_prompt(model, bos_tok, None, test, task.format, max_length=16)[0]
    assert base["perplexity"] == pytest.approx(with_bos["perplexity"], rel=1e-5)
    assert base["perplexity"] != pytest.approx(without["perplexity"], rel=1e-3) and base["tokens"] == without["tokens"]


def test_a_chat_prompt_is_served_on_the_conversation_as_it_was_trained(bos_tok):
    """A chat task's text is its chat template's rendering: training reads [P, conversation] with no BOS added
    (the template writes its own special tokens, here none), so serving adds none either, whatever the stored
    prompt's bos flag says (prompts stored before chat prompts recorded bos false say true)."""
    from softprompt.data import ChatFormat
    from softprompt.data.chat import chat_prompt_ids, conversation_prompt

    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fmt = ChatFormat(chat_template=template)
    msgs = [{"role": "user", "content": "good movie"}]
    trained = chat_prompt_ids(bos_tok, msgs, template)
    assert trained == [WORD_IDS["good"], WORD_IDS["movie"]]  # the layout encode_chat and the chat report use
    model = make_model("llama")
    engine = Engine(model, bos_tok)
    kv = compute_prompt_kv(model, soft_prompt(model, bos_tok)())
    for bos in (True, False):
        engine.add_kv(f"chat{bos}", kv, fmt, bos=bos)
        text = conversation_prompt(bos_tok, engine.task(f"chat{bos}").formats[0], msgs)
        (row,) = engine.prepare("generate", GenerateRequest(f"chat{bos}", text, raw=True, max_tokens=2)).rows
        assert row.ids == trained
        (row,) = engine.prepare("score", ScoreRequest(f"chat{bos}", text, " positive", raw=True)).rows
        assert row.ids == trained + [WORD_IDS["positive"]]


def test_an_input_with_no_tokens_and_no_bos_is_refused_not_read_from_padding(tokenizer):
    """Without a BOS an empty input leaves nothing before the first label or continuation token to predict
    it: a RequestError (422) naming it, not an IndexError (500) or, batched, a score read at a padding column."""
    from softprompt.engine import RequestError

    model = make_model("llama")
    engine = Engine(model, tokenizer)
    engine.add_kv("soft", compute_prompt_kv(model, soft_prompt(model, tokenizer)()), FMT)
    engine.add_base("base")
    for task in ("soft", "base"):
        with pytest.raises(RequestError, match="the input has no tokens"):
            engine.prepare("score", ScoreRequest(task, "", " positive", raw=True))
        with pytest.raises(RequestError, match="the input has no tokens"):
            engine.prepare("generate", GenerateRequest(task, "", raw=True, max_tokens=2))
    with pytest.raises(RequestError, match="the input has no tokens"):
        engine.prepare("classify", ClassifyRequest("soft", "", raw=True))


def test_an_empty_prompt_after_a_bos_is_generated_from_and_list_errors_name_their_input(bos_tok, tokenizer):
    """With a BOS, an empty prompt is an answer from the start (OpenAI accepts prompt ""): it was refused as
    having no tokens before the BOS was put in front. Of a list of inputs, the one at fault is named."""
    from softprompt.engine import RequestError

    model = make_model("llama")
    engine = Engine(model, bos_tok)
    engine.add_base("base")
    (row,) = engine.prepare("generate", GenerateRequest("base", "", raw=True, max_tokens=2)).rows
    assert row.ids == [BOS]
    assert len(engine.generate([GenerateRequest("base", "", raw=True, max_tokens=2)])[0].tokens) <= 2
    engine = Engine(model, tokenizer)
    engine.add_base("base")
    reqs = [GenerateRequest("base", "the movie", raw=True, max_tokens=2), GenerateRequest("base", "", raw=True)]
    with pytest.raises(RequestError, match=r"^request 1: task 'base': the input has no tokens"):
        engine.generate(reqs)


def test_exporting_a_prompt_stored_without_the_bos_to_peft_warns_that_the_layout_is_lost(tmp_path, tokenizer,
                                                                                        caplog):
    from softprompt.store import export_peft

    model = make_model("llama")
    for bos in (True, False):
        out = save_prompt(tmp_path / f"p{bos}", soft_prompt(model, tokenizer), model, task=TASK, bos=bos)
        caplog.clear()
        with caplog.at_level("WARNING"):
            peft = export_peft(out, tmp_path / f"peft{bos}")
        assert ("a PEFT folder cannot record that" in caplog.text) is not bos
        assert load_prompt(peft).bos  # what the warning says: read back, [prompt, BOS, text]


def test_validation_generates_from_the_input_cut_where_training_and_the_report_cut_it(bos_tok, monkeypatch):
    """A generation task's validation fed the whole source (past --max-length, even past the context), while
    training and the report's engine keep the BOS and the last tokens."""
    import softprompt.evaluate as evaluate

    model = make_model("llama")
    fmt = TaskFormat("Review: {text}\nSentiment:", "label")
    ex = fmt.render({"text": "the movie was very good", "label": " positive"})
    kv = compute_prompt_kv(model, soft_prompt(model, bos_tok)())
    seen, real = [], evaluate.generate

    def spy(model, input_ids, attention_mask, *args, **kwargs):
        seen.append(input_ids[attention_mask.bool()].tolist())
        return real(model, input_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", spy)
    evaluate_prompt(model, bos_tok, kv, [ex], fmt, max_new_tokens=2, max_length=4, with_loss=False)
    engine = Engine(model, bos_tok, max_input_tokens=4, truncate=True)
    engine.add_kv("soft", kv, fmt)
    (row,) = engine.prepare("generate", GenerateRequest("soft", ex.source, raw=True, max_tokens=2)).rows
    assert seen == [row.ids] and row.ids == [BOS] + plain(bos_tok, "very good\nSentiment:")[-3:]
