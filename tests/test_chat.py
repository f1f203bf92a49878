"""Chat-format tasks: assistant-only target masks, malformed records, store/engine/server round trip, eval report."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from softprompt.cli import main
from softprompt.data import ChatFormat, DataError, collate, load_task, parse_messages
from softprompt.data.chat import assistant_spans, conversation_prompt, encode_chat
from softprompt.engine import Engine, GenerateRequest
from softprompt.forward import family_of
from softprompt.store import PromptStore
from tests.conftest import WORD_IDS, make_model, make_tokenizer, write_jsonl

# a chat template written in words of the tiny vocabulary (tests/conftest.py WORDS); it has no BOS
TEMPLATE = ("{% for m in messages %}{% if m.role == 'system' %}Classify {{ m.content }} ."
            "{% elif m.role == 'user' %}Review {{ m.content }} .{% else %}Sentiment {{ m.content }} [EOS]{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}Sentiment{% endif %}")
HEADS = {"system": ("Classify", "."), "user": ("Review", "."), "assistant": ("Sentiment", "[EOS]")}


def chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def conversation(system: bool, turns: int, seed: int = 0) -> list[dict]:
    words = [("good movie", "positive"), ("the plot was bad", "negative"), ("a great film", "positive"),
             ("awful", "negative")]
    msgs = [{"role": "system", "content": "sentiment"}] if system else []
    for i in range(turns):
        text, label = words[(seed + i) % len(words)]
        msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
    return msgs


def independent_mask(tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids and target mask built piece by piece from what TEMPLATE writes (not by rendering prefixes):
    an assistant turn's target is its content and the [EOS] closing it, never its "Sentiment" header."""
    ids, mask = [], []
    for m in messages:
        head, tail = HEADS[m["role"]]
        for part, target in ((head, False), (m["content"], m["role"] == "assistant"),
                             (tail, m["role"] == "assistant")):
            piece = tok(part, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [target] * len(piece)
    return ids, mask


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("turns", [1, 3])
def test_target_mask_is_exactly_the_assistant_tokens(system, turns):
    tok = chat_tokenizer()
    msgs = conversation(system, turns)
    fmt = ChatFormat()
    (enc,) = encode_chat(tok, [fmt.render({"messages": msgs})], fmt, max_length=256)
    ids, mask = independent_mask(tok, msgs)
    assert enc.input_ids == ids
    assert enc.target_mask == mask
    assert sum(mask) == 2 * turns  # each reply is one word + [EOS]
    batch = collate([enc], pad_id=0, padding_side="left")
    assert batch.target_mask[0].tolist() == mask


def test_a_cut_conversation_trains_only_on_whole_assistant_turns():
    """A conversation over --max-length kept its last tokens, and an answer the cut went through trained on its
    tail with neither its question nor its header; a cut that leaves no whole answer is refused."""
    tok, fmt = chat_tokenizer(), ChatFormat()
    msgs = [{"role": "user", "content": "good movie"}, {"role": "assistant", "content": "the plot was great"},
            {"role": "user", "content": "awful"}, {"role": "assistant", "content": "negative"}]
    ids, mask = independent_mask(tok, msgs)
    # Review good movie . Sentiment | the plot was great [EOS] | Review awful . Sentiment | negative [EOS]
    assert len(ids) == 16 and mask[5:10] == [True] * 5 and mask[14:] == [True, True]
    for keep in (10, 9, 8, 7, 6):  # cuts inside the first answer (at tokens 6 to 9), and right after it
        (enc,) = encode_chat(tok, [fmt.render({"messages": msgs})], fmt, max_length=keep)
        assert enc.input_ids == ids[-keep:]
        assert enc.target_mask == [False] * (keep - 2) + [True, True], keep  # "negative [EOS]" only
    (enc,) = encode_chat(tok, [fmt.render({"messages": msgs})], fmt, max_length=12)  # the first answer whole
    assert enc.target_mask == mask[-12:]
    with pytest.raises(DataError, match="no whole assistant turn is left within --max-length 1"):
        encode_chat(tok, [fmt.render({"messages": msgs})], fmt, max_length=1)  # the cut is inside the last one


def test_loss_is_the_cross_entropy_of_the_assistant_tokens_only():
    tok, model = chat_tokenizer(), make_model("llama")
    fmt = ChatFormat()
    examples = [fmt.render({"messages": conversation(s, t, seed=t)}) for s, t in ((True, 2), (False, 1))]
    batch = collate(encode_chat(tok, examples, fmt), pad_id=0)
    with torch.no_grad():
        loss = family_of(model).loss(model, batch, None)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = []
    for row, ex in enumerate(examples):
        ids, mask = independent_mask(tok, ex.messages)
        want += [F.cross_entropy(logits[row, t - 1], torch.tensor(ids[t]), reduction="none")
                 for t in range(len(ids)) if mask[t]]
    torch.testing.assert_close(loss, torch.stack(want).mean(), rtol=1e-5, atol=1e-6)


def test_single_target_encoding_is_unchanged():
    from softprompt.data import Example, encode

    (enc,) = encode(make_tokenizer(), [Example("Review good", " positive")])
    assert enc.target_mask is None
    assert collate([enc], 0).target_mask[0].tolist() == [False, False, True]


def test_template_that_rewrites_earlier_turns_is_refused():
    tok = make_tokenizer()
    # the first word depends on the conversation's length: a prefix renders differently from the whole
    tok.chat_template = "{% if messages|length > 2 %}the{% else %}a{% endif %} " + TEMPLATE
    with pytest.raises(DataError, match="does not render assistant turn 2 as a prefix"):
        assistant_spans(tok, conversation(False, 2))



def _merging_tokenizer():
    """A ChatML tokenizer whose BPE writes two newlines as one token, as Qwen2's does."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("userassistantHelo.!\n "))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["\n\n"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "\n")]))
    bpe.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    bpe.decoder = decoders.Fuse()  # the tokens' texts joined as they are
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>",
        chat_template="{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_reply_whose_first_characters_merge_with_the_generation_prompt_is_refused_naming_why():
    """Qwen2's BPE writes "assistant\n" + "\nHello" as "assistant", "\n\n", ...: the turn was refused as a
    template that "rewrites earlier turns", which it does not; a reply starting with a newline is the cause."""
    tok = _merging_tokenizer()
    plain = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hello!"}]
    ids, spans = assistant_spans(tok, plain)
    assert tok.decode(ids[spans[0][0]:spans[0][1]]) == "Hello!<|im_end|>\n"
    led = [plain[0], {"role": "assistant", "content": "\nHello!"}]
    with pytest.raises(DataError, match=r"assistant turn 2 starts with '\\nHello!<\|im_', which the tokenizer "
                                        r".* merges with the end of the generation prompt .*strip the reply's "
                                        "leading whitespace"):
        assistant_spans(tok, led)

def test_tokenizer_without_chat_template_is_named():
    tok = make_tokenizer()
    tok.name_or_path = "tiny/no-template"
    with pytest.raises(DataError, match="tokenizer of tiny/no-template has no chat template.*--chat-template"):
        assistant_spans(tok, conversation(False, 1))
    (ids, spans) = assistant_spans(tok, conversation(False, 1), chat_template=TEMPLATE)
    assert spans == [(5, 7)]  # Review good movie . Sentiment | positive [EOS]


@pytest.mark.parametrize("record, problem", [
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "good"}]},
     "message 1 has role 'robot'"),
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "user", "content": "good"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "good"}]},
     "message 1 content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": None}]},
     "message 2 content must be a string, got NoneType"),
    ({"messages": "good"}, "'messages' must be a list"),
    # it trained on the end-of-turn marker alone, and evaluation expected an empty reply
    ({"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": " \n"}]},
     "message 2 is an assistant turn with no content"),
    ({"text": "good"}, "field 'messages' is missing"),
    # OpenAI's "weight" and "name" are read; any other key is refused rather than dropped in silence
    ({"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": "x", "weight": 2}]},
     "message 2 weight must be 0 \\(not trained on\\) or 1, got 2"),
    ({"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": "x", "weight": True}]},
     "message 2 weight must be 0"),
    ({"messages": [{"role": "user", "content": "good", "weight": 0}, {"role": "assistant", "content": "x"}]},
     "message 1 has a weight, which only an assistant message takes"),
    ({"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": "x", "weight": 0}]},
     "every assistant message has weight 0"),
    ({"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": "x",
                                                        "tool_calls": []}]},
     "message 2 has key 'tool_calls', which is not read \\(tool calls are not supported\\)"),
    ({"messages": [{"role": "user", "content": "good", "lang": "en"}, {"role": "assistant", "content": "x"}]},
     "message 1 has key 'lang', which is not read; a message takes role, content, name, weight"),
    ({"messages": [{"role": "user", "content": "good", "name": 3}, {"role": "assistant", "content": "x"}]},
     "message 1 name must be a non-empty string, got 3"),
])
def test_malformed_records_are_refused_with_file_and_line(tmp_path, record, problem):
    good = {"messages": conversation(False, 1)}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")  # the bad record is on line 3
    with pytest.raises(DataError, match=rf"train.jsonl line 3: .*{problem}"):
        load_task(train_file=path)


def test_encoding_errors_name_the_record_s_file_and_line(tmp_path):
    tok = chat_tokenizer()
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation(False, 1)}] * 2)
    task = load_task(train_file=path)
    with pytest.raises(DataError, match=r"^train\.jsonl line 2: no whole assistant turn is left"):
        encode_chat(tok, task.examples("train")[1:], task.format, max_length=1)  # was "example 0"
    tok.chat_template = "{% if messages|length > 1 %}the{% else %}a{% endif %} " + TEMPLATE
    with pytest.raises(DataError, match=r"^train\.jsonl line 1: the chat template .* does not render"):
        encode_chat(tok, task.examples("train"), task.format)


def test_an_assistant_turn_with_weight_0_is_context_not_target():
    """OpenAI's fine-tuning format: "weight": 0 on an assistant message means do not train on it; the key was
    dropped and the turn trained."""
    tok, fmt = chat_tokenizer(), ChatFormat()
    msgs = conversation(False, 2)
    msgs[1]["weight"], msgs[3]["weight"] = 0, 1
    ex = fmt.render({"messages": msgs})
    (enc,) = encode_chat(tok, [ex], fmt)
    ids, mask = independent_mask(tok, conversation(False, 2))
    n = len(independent_mask(tok, conversation(False, 1))[0])  # the first exchange's tokens
    assert enc.input_ids == ids  # the weight is not part of the text
    assert enc.target_mask == [False] * n + mask[n:] and sum(mask[n:]) == 2  # the second reply only
    assert ex.target == "negative"
    msgs[1]["weight"], msgs[3]["weight"] = 1, 0  # the last trained turn is what evaluation generates
    ex = fmt.render({"messages": msgs})
    assert ex.target == "positive" and ex.last_assistant == 1
    (enc,) = encode_chat(tok, [ex], fmt)
    assert enc.target_mask == mask[:n] + [False] * (len(ids) - n) and sum(mask[:n]) == 2


def test_a_message_name_reaches_the_chat_template_and_the_weight_does_not():
    from softprompt.data.chat import render_chat

    tok = make_tokenizer()
    template = ("{% for m in messages %}{{ m.name or 'the' }} {{ m.content }}{% if m.weight is defined %} W"
                "{% endif %} {% endfor %}")
    msgs = parse_messages([{"role": "user", "content": "good", "name": "movie"},
                           {"role": "assistant", "content": "positive", "weight": 1}])
    assert render_chat(tok, msgs, template) == "movie good the positive "


def test_chat_files_are_detected_and_mixed_formats_refused(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(True, 2)}])
    task = load_task(train_file=chat)
    assert isinstance(task.format, ChatFormat) and task.examples("train")[0].messages[0]["role"] == "system"
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "good", "label": "positive"}])
    with pytest.raises(DataError, match="chat.jsonl hold chat records .* plain.jsonl do not"):
        load_task(train_file=chat, test_file=plain)
    assert parse_messages([{"role": "user", "content": "x"}], require_assistant=False)
    with pytest.raises(DataError, match="--target-field answer does not apply to chat records"):
        load_task(train_file=chat, target_field="answer")  # it was ignored in silence
    assert isinstance(load_task(train_file=chat, target_field="messages").format, ChatFormat)  # a stored chat task's


def run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """``softprompt train`` on chat records with a --chat-template file (the tiny tokenizer has none), into a store."""
    d = tmp_path_factory.mktemp("chat")
    make_model("llama").save_pretrained(d / "tiny")
    make_tokenizer().save_pretrained(d / "tiny")
    records = [{"messages": conversation(i % 2 == 0, 1 + i % 3, seed=i)} for i in range(12)]
    write_jsonl(d / "train.jsonl", records[:8])
    write_jsonl(d / "test.jsonl", records[8:])
    (d / "chat.jinja").write_text("\ufeff" + TEMPLATE, encoding="utf-8")  # a byte order mark is not template text
    rc, out, err = run(["train", "--model", d / "tiny", "--train-file", d / "train.jsonl", "--test-file",
                        d / "test.jsonl", "--chat-template", d / "chat.jinja", "--num-virtual-tokens", "3",
                        "--batch-size", "4", "--max-steps", "2", "--k-shot", "2", "--max-new-tokens", "4",
                        "--init-text", "Classify the sentiment .", "--output-dir", d / "run", "--store", d / "store",
                        "--task", "chat"])
    assert rc == 0, err
    return d, out


def test_train_report_has_generation_metrics_and_samples(chat_run):
    d, out = chat_run
    report = json.loads((d / "run" / "eval.json").read_text())
    assert list(report) == ["no soft prompt (chat template only)", "init text as system prompt",
                            "2-shot conversations", "tuned soft prompt"]
    for metrics in report.values():
        assert {"loss", "perplexity", "exact_match", "f1", "rouge_l", "n"} <= set(metrics)
        assert metrics["n"] == 4 and len(metrics["samples"]) == 3
        assert {"conversation", "expected", "predicted"} == set(metrics["samples"][0])
    assert "rouge_l" in out


def test_stored_chat_task_round_trips_through_store_engine_cli_and_server(chat_run):
    d, _ = chat_run
    store = PromptStore(d / "store")
    record = store.load("chat").task_record
    assert record.chat and record.chat_template == TEMPLATE
    assert store.load("chat").bos is False  # trained on the conversation as its template renders it: no BOS added
    msgs = [{"role": "system", "content": "sentiment"}, {"role": "user", "content": "a good film"}]

    tok, model = make_tokenizer(), make_model("llama")  # what --model tiny loads: no chat template of its own
    engine = Engine(model, tok)
    engine.load_from_store(store, "chat")
    text = conversation_prompt(tok, engine.task("chat").formats[0], msgs)
    assert text == "Classify sentiment .Review a good film .Sentiment"  # the stored template, prompt before it
    (direct,) = engine.generate([GenerateRequest("chat", text, raw=True, max_tokens=5)])

    rc, out, err = run(["generate", "--model", d / "tiny", "--store", d / "store", "--task", "chat",
                        "--messages", json.dumps(msgs), "--max-new-tokens", "5"])
    assert rc == 0, err
    assert json.loads(out)["output"] == direct.text and json.loads(out)["input"] == text

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from softprompt.server import Scheduler, ServerState, create_app

    state = ServerState(engine, Scheduler(engine), max_tokens=16)
    with TestClient(create_app(state)) as client:
        r = client.post("/v1/chat/completions", json={"model": "chat", "messages": msgs, "max_tokens": 5,
                                                      "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == direct.text
        assert r.json()["usage"]["completion_tokens"] == len(direct.tokens)
        with client.stream("POST", "/v1/chat/completions", json={"model": "chat", "messages": msgs, "max_tokens": 5,
                                                                "temperature": 0, "stream": True}) as r:
            lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
        assert "".join(json.loads(ln)["choices"][0]["delta"].get("content", "") for ln in lines) == direct.text
        bad = client.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 5,
                                                        "messages": [{"role": "tool", "content": "x"}]})
        assert bad.status_code == 422 and "role 'tool'" in bad.text


def test_eval_of_the_stored_chat_prompt_writes_the_metrics(chat_run):
    d, _ = chat_run
    rc, out, err = run(["eval", "--model", d / "tiny", "--prompt", d / "run" / "prompt", "--test-file",
                        d / "test.jsonl", "--baselines", "no_prompt", "--max-new-tokens", "3", "--report",
                        d / "eval.json"])
    assert rc == 0, err
    report = json.loads((d / "eval.json").read_text())
    assert {"loss", "perplexity", "exact_match", "f1", "rouge_l"} <= set(report["tuned soft prompt"])


def test_rouge_l_is_the_lcs_f_measure():
    from softprompt.evaluate import rouge_l

    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # normalised words: "cat sat on mat" vs "cat on big mat": LCS "cat on mat" = 3; P = R = 3/4
    assert rouge_l("The cat sat on the mat.", "a cat on big mat") == pytest.approx(0.75)
    assert rouge_l("good", "bad") == 0.0 and rouge_l("", "") == 1.0


def test_tune_searches_a_chat_task_by_validation_loss_and_stores_the_best(chat_run):
    d, _ = chat_run
    rc, out, err = run(["tune", "--model", d / "tiny", "--train-file", d / "train.jsonl", "--validation-from-train",
                        "0.25", "--chat-template", d / "chat.jinja", "--num-virtual-tokens", "3", "--batch-size", "4",
                        "--lrs", "0.001,0.3", "--min-steps", "1", "--max-new-tokens", "3",
                        "--output-dir", d / "tuned", "--store", d / "store", "--task", "chat_tuned"])
    assert rc == 0, err
    trials = json.loads((d / "tuned" / "trials.json").read_text())
    assert trials["metric"] == "loss" and len(trials["trials"]) == 2
    assert all(math.isfinite(r["val_loss"]) for t in trials["trials"] for r in t["rungs"])
    record = json.loads((d / "store" / "chat_tuned" / "softprompt.json").read_text())["task"]
    assert record["kind"] == "chat"  # the stored prompt is a chat task, as train stores it


def test_the_k_shot_and_system_baselines_keep_their_added_turns_beyond_max_length(monkeypatch):
    """The turns a baseline adds take no room from --max-length (as a template task's k-shot context takes
    none): cut to --max-length, the shots and the system turn were dropped and the row still read '2-shot'."""
    import softprompt.evaluate as evaluate
    from softprompt.config import DataArgs, EvalArgs
    from softprompt.data import TaskData
    from softprompt.data.chat import chat_prompt_ids
    from softprompt.workflows.baselines import chat_baselines

    tok, model = chat_tokenizer(), make_model("llama")
    fmt = ChatFormat()
    exs = [fmt.render({"messages": conversation(False, 1, seed=i)}) for i in range(6)]
    task = TaskData(fmt, {"train": exs[:4], "test": exs[4:]})
    longest = max(len(chat_prompt_ids(tok, ex.messages)) for ex in exs)
    seen, real = [], evaluate.generate_texts

    def spy(model, tokenizer, kv, prompts, *args, **kwargs):
        seen.append(prompts)
        return real(model, tokenizer, kv, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_texts", spy)
    args = {"eval": EvalArgs(k_shot=2, max_new_tokens=2), "data": DataArgs(max_length=longest)}
    report = chat_baselines(model, tok, task, args, "sentiment", task.examples("test"))
    assert list(report) == ["no soft prompt (chat template only)", "init text as system prompt",
                            "2-shot conversations"]
    for prompts, name in zip(seen, report, strict=True):
        if name == "init text as system prompt":
            assert all(p[0] == WORD_IDS["Classify"] for p in prompts)  # the system turn opens it
        if name == "2-shot conversations":
            assert all(len(p) > longest for p in prompts)  # both shots are there


def test_a_baseline_row_the_template_refuses_is_skipped_and_the_prompt_is_saved(tmp_path):
    """A template that raises on a system turn (Gemma's "System role not supported") made the "init text as
    system prompt" row raise DataError after training, before prompt/ and the store: exit 2, nothing saved."""
    no_system = TEMPLATE.replace("Classify {{ m.content }} .", "{{ raise_exception('System role not supported') }}")
    make_model("llama").save_pretrained(tmp_path / "tiny")
    make_tokenizer().save_pretrained(tmp_path / "tiny")
    records = [{"messages": conversation(False, 1 + i % 2, seed=i)} for i in range(8)]
    write_jsonl(tmp_path / "train.jsonl", records[:6])
    write_jsonl(tmp_path / "test.jsonl", records[6:])
    (tmp_path / "chat.jinja").write_text(no_system)
    rc, out, err = run(["train", "--model", tmp_path / "tiny", "--train-file", tmp_path / "train.jsonl",
                        "--test-file", tmp_path / "test.jsonl", "--chat-template", tmp_path / "chat.jinja",
                        "--num-virtual-tokens", "2", "--batch-size", "4", "--max-steps", "1", "--k-shot", "1",
                        "--max-new-tokens", "2", "--init-text", "Classify the sentiment .",
                        "--output-dir", tmp_path / "run", "--store", tmp_path / "store", "--task", "chat"])
    assert rc == 0, err
    assert (tmp_path / "run" / "prompt" / "softprompt.json").is_file()
    assert PromptStore(tmp_path / "store").load("chat").task_record.chat
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(report) == ["no soft prompt (chat template only)", "1-shot conversations", "tuned soft prompt"]
    warned = [line for line in err.splitlines() if " WARNING " in line]
    assert any("init text as system prompt" in w and "System role not supported" in w for w in warned), err


def test_a_template_ending_assistant_turns_with_whitespace_only_is_refused_with_the_fix():
    """Alpaca-style ``role: content\\n``: no end-of-turn marker was found, the targets taught no stop and
    generation ran to its token limit inventing turns; writing the EOS after the reply is the fix."""
    alpaca = ("{% for m in messages %}{% if m.role == 'user' %} Review {{ m.content }} .{% else %} Sentiment "
              "{{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %} Sentiment{% endif %}")
    tok, ex = make_tokenizer(), ChatFormat().render({"messages": conversation(False, 2)})
    with pytest.raises(DataError, match=r"ends an assistant turn with whitespace only.*\{\{ eos_token \}\}"):
        encode_chat(tok, [ex], ChatFormat(chat_template=alpaca))
    with pytest.raises(DataError, match="ends an assistant turn with nothing"):
        encode_chat(tok, [ex], ChatFormat(chat_template=alpaca.replace("\n", "")))
    fixed = alpaca.replace("\n", " {{ eos_token }}\n")
    (enc,) = encode_chat(tok, [ex], ChatFormat(chat_template=fixed))
    eos = [i for i, t in zip(enc.input_ids, enc.target_mask, strict=True) if t and i == tok.eos_token_id]
    assert len(eos) == 2  # each reply's target ends with the EOS, where generation stops


def test_the_server_passes_a_message_name_to_the_chat_template(tmp_path):
    """The server's messages kept only role and content: a template that writes ``m.name`` (training passes
    it, as ``generate --messages`` does) was served a conversation the prompt was not trained on."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from softprompt.server import Scheduler, ServerState, create_app

    named = TEMPLATE.replace("Review {{ m.content }}", "Review {{ m.name or '' }} {{ m.content }}")
    tok, model = make_tokenizer(), make_model("llama")
    engine = Engine(model, tok)
    engine.add_base("chat", ChatFormat(chat_template=named))
    msgs = [{"role": "user", "content": "a good film", "name": "movie"}]
    text = conversation_prompt(tok, engine.task("chat").formats[0], msgs)
    assert text == "Review movie a good film .Sentiment"
    (direct,) = engine.generate([GenerateRequest("chat", text, raw=True, max_tokens=5)])
    unnamed = conversation_prompt(tok, engine.task("chat").formats[0], [{"role": "user", "content": "a good film"}])
    with TestClient(create_app(ServerState(engine, Scheduler(engine), max_tokens=16))) as client:
        r = client.post("/v1/chat/completions", json={"model": "chat", "messages": msgs, "max_tokens": 5,
                                                      "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == direct.text
        assert r.json()["usage"]["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
        assert r.json()["usage"]["prompt_tokens"] != len(tok(unnamed, add_special_tokens=False)["input_ids"])
        for bad in ("", "  ", 3):
            r = client.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 5,
                                                          "messages": [{**msgs[0], "name": bad}]})
            assert r.status_code == 422 and "name" in r.text, (bad, r.text)


def test_a_long_conversation_keeps_its_template_s_bos_when_cut_in_training_eval_and_serving(monkeypatch):
    """A conversation over --max-length kept only its end, dropping the BOS its template writes (Llama 3's
    <|begin_of_text|>, Gemma's <bos>), though a template task keeps its leading special ids when cut."""
    import softprompt.evaluate as evaluate
    from softprompt.engine import ScoreRequest
    from tests.test_bos import BOS, word_tokenizer

    tok, model = word_tokenizer("[BOS] $A", ("[BOS]",)), make_model("llama")
    fmt = ChatFormat(chat_template="[BOS]" + TEMPLATE)
    msgs = conversation(True, 4)
    full, _ = assistant_spans(tok, msgs, fmt.chat_template)
    assert full[0] == BOS and full[1] != BOS
    limit = len(full) - 5
    (enc,) = encode_chat(tok, [fmt.render({"messages": msgs})], fmt, max_length=limit)
    assert enc.input_ids == [BOS] + full[len(full) - limit + 1:]
    assert any(enc.target_mask)

    seen, real = [], evaluate.generate_texts

    def spy(model, tokenizer, kv, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(model, tokenizer, kv, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_texts", spy)
    short = 6
    evaluate.evaluate_chat(model, tok, None, [fmt.render({"messages": msgs})], fmt, max_new_tokens=1,
                           max_length=short, with_loss=False)
    assert seen[0][0] == BOS and len(seen[0]) == short

    engine = Engine(model, tok, max_input_tokens=short, truncate=True)
    engine.add_base("chat", fmt)
    text = conversation_prompt(tok, fmt, msgs[:-1])
    (row,) = engine.prepare("generate", GenerateRequest("chat", text, raw=True, max_tokens=1)).rows
    assert row.ids[0] == BOS and row.ids == seen[0]  # served as it was evaluated
    (row,) = engine.prepare("score", ScoreRequest("chat", text, " negative", raw=True)).rows
    assert row.ids[0] == BOS and len(row.ids) == short  # --max-length counts the continuation


@pytest.mark.parametrize("special", [True, False])
def test_generate_messages_without_a_chat_task_ends_at_the_chat_templates_end_of_turn(monkeypatch, special):
    # `generate --messages` on the base model renders the conversation with the tokenizer's own chat template, as
    # the server's chat route does, but did not mark the request as such: the reply ran past the template's end of
    # turn when that is not the EOS (Qwen2.5 base: ChatML's <|im_end|>, EOS <|endoftext|>), where the server stops
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import softprompt.workflows
    from softprompt.server import Scheduler, ServerState, create_app

    model, tok = make_model("llama"), make_tokenizer()
    if special:  # a special token, as <|im_end|> is; else the marker is plain text (a stop string)
        tok.add_special_tokens({"additional_special_tokens": ["Madrid"]})
    tok.chat_template = TEMPLATE.replace("[EOS]", "Madrid")  # an assistant turn ends with "Madrid", not the EOS

    def always_the_marker(module, inputs, out):  # the model ends its turn at once
        out = out.clone()
        out[..., WORD_IDS["Madrid"]] += 100.0
        return out

    model.lm_head.register_forward_hook(always_the_marker)
    monkeypatch.setattr(softprompt.workflows, "load_model_from_args", lambda *a, **k: (model, tok))
    msgs = [{"role": "user", "content": "a good film"}]
    rc, out, err = run(["generate", "--messages", json.dumps(msgs), "--max-new-tokens", "6"])
    assert rc == 0, err
    got = json.loads(out)
    assert got["input"] == "Review a good film .Sentiment" and got["finish_reason"] == "stop"
    assert got["output"].strip() == ""  # what comes before the marker (a plain-text stop keeps the space before it)
    engine = Engine(model, tok)
    engine.add_base("base")
    with TestClient(create_app(ServerState(engine, Scheduler(engine), max_tokens=16))) as client:
        r = client.post("/v1/chat/completions", json={"model": "base", "messages": msgs, "max_tokens": 6,
                                                      "temperature": 0})
    served = r.json()["choices"][0]
    assert (got["output"], got["finish_reason"]) == (served["message"]["content"], served["finish_reason"])
    # text given with --input is no conversation: not cut there
    rc, out, err = run(["generate", "--input", "a good film", "--raw", "--max-new-tokens", "3", "--stop", ""])
    assert rc == 0, err
    assert json.loads(out)["finish_reason"] == "length"
