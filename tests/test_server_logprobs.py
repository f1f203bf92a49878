"""OpenAI ``logprobs`` on /v1/completions and /v1/chat/completions: the engine's values, OpenAI's formats, the
cut at a stop string, streaming, validation; token strings of a byte-level BPE (softprompt/server/logprobs.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from softprompt.engine import Engine, GenerateRequest  # noqa: E402
from softprompt.engine.detokenize import Detokenizer  # noqa: E402
from softprompt.forward import TokenLogprob  # noqa: E402
from softprompt.server import Scheduler, ServerState, create_app  # noqa: E402
from softprompt.server.logprobs import Renderer, chat_format, entries_of  # noqa: E402
from tests.conftest import make_model, make_tokenizer  # noqa: E402
from tests.test_server import make_store  # noqa: E402

COMPLETION_KEYS = {"tokens", "token_logprobs", "top_logprobs", "text_offset"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    model = make_model("llama")
    store = make_store(tmp_path_factory.mktemp("store"), model, tokenizer)
    engine = Engine.from_store(store, model, tokenizer, max_batch_rows=16)
    engine.add_base("base")
    state = ServerState(engine, Scheduler(engine, max_batch_requests=16, max_wait_ms=5), max_tokens=64)
    with TestClient(create_app(state)) as client:
        yield engine, client


def expected_strings(tok, tokens: list[int], top: list[list[int]]) -> tuple[list[str], list[list[str]]]:
    """The oracle of the token strings: the text each token (or each alternative, in the token's place)
    adds to the text of ALL the tokens before it after the prompt (the engine's completion text: what they
    decode to after a plain lead token); special alternatives by name."""
    def text(ids):
        return Detokenizer(tok).text(ids).rstrip("\ufffd")

    def added(i, t):
        return text(tokens[:i] + [t])[len(text(tokens[:i])):]

    special = set(tok.all_special_ids)
    return ([added(i, t) for i, t in enumerate(tokens)],
            [[tok.convert_ids_to_tokens(a) if a in special else added(i, a) for a in alts]
             for i, alts in enumerate(top)])


def offsets_of(strings: list[str]) -> list[int]:
    return [len("".join(strings[:i])) for i in range(len(strings))]


def top_dict(strings: list[str], values: list[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s, v in zip(strings, values, strict=True):
        out.setdefault(s, v)
    return out


def stream(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln)["choices"][0] for ln in lines[:-1]]


def test_completions_top_logprobs_include_the_sampled_token(setup):
    # OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    # elements"; a sampled token outside the k most likely was missing from its place's top_logprobs
    _, client = setup
    body = {"model": "t5", "prompt": "France", "max_tokens": 12, "temperature": 2, "seed": 7, "logprobs": 1}
    lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert lp["tokens"]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        # (a more likely token with the same string keeps its place: the keys are strings)
        assert token in top and top[token] >= logprob - 1e-6 and len(top) <= 2
        assert list(top.values()) == sorted(top.values(), reverse=True)
    # the case checked happened: some sampled token was not the most likely one (and its string is another)
    assert any(len(top) == 2 for top in lp["top_logprobs"]), lp


def test_completions_logprobs_are_the_engines_in_openais_format(setup):
    engine, client = setup
    tok = engine.tok
    # "Italy": a word after 9 tokens that decode to nothing (ids outside the test tokenizer's words)
    body = {"model": "t5", "prompt": ["France", "Italy"], "max_tokens": 16, "temperature": 0, "logprobs": 3}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    refs = engine.generate([GenerateRequest("t5", p, max_tokens=16, logprobs=3) for p in body["prompt"]])
    words = 0
    for choice, ref in zip(r.json()["choices"], refs, strict=True):
        lp = choice["logprobs"]
        assert set(lp) == COMPLETION_KEYS and choice["text"] == ref.text
        tokens, top = expected_strings(tok, ref.tokens, [[a for a, _ in x.top] for x in ref.logprobs])
        assert lp["tokens"] == tokens and "".join(tokens) == ref.text  # the strings join into the text
        assert lp["text_offset"] == offsets_of(tokens)
        assert lp["token_logprobs"] == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-6)
        assert lp["top_logprobs"] == [top_dict(s, [v for _, v in x.top]) for s, x in zip(top, ref.logprobs,
                                                                                           strict=True)]
        for d, x in zip(lp["top_logprobs"], ref.logprobs, strict=True):
            assert list(d.values()) == sorted(d.values(), reverse=True)  # ranked, most likely first
            assert x.top[0][1] >= x.logprob - 1e-6 and len(x.top) == 3
        assert all(isinstance(v, float) for v in lp["token_logprobs"])
        assert all(isinstance(o, int) for o in lp["text_offset"])
        words += sum(bool(t.strip()) for t in tokens)
    assert words  # some tokens are words: the strings are not all empty
    # logprobs 0: the chosen tokens only, top_logprobs null; no logprobs: null
    zero = client.post("/v1/completions", json={**body, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert zero["top_logprobs"] is None and zero["tokens"] == r.json()["choices"][0]["logprobs"]["tokens"]
    plain = client.post("/v1/completions", json={**body, "logprobs": None}).json()["choices"]
    assert [c["logprobs"] for c in plain] == [None, None]


def test_chat_logprobs_are_the_engines_in_openais_format(setup):
    engine, client = setup
    tok = engine.tok
    body = {"model": "t3", "messages": [{"role": "user", "content": "Spain"}], "max_tokens": 8, "temperature": 0,
            "logprobs": True, "top_logprobs": 4}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    (ref,) = engine.generate([GenerateRequest("t3", "Spain", max_tokens=8, logprobs=4)])
    lp = r.json()["choices"][0]["logprobs"]
    assert set(lp) == {"content", "refusal"} and lp["refusal"] is None
    tokens, top = expected_strings(tok, ref.tokens, [[a for a, _ in x.top] for x in ref.logprobs])
    assert [e["token"] for e in lp["content"]] == tokens and "".join(tokens) == ref.text
    for e, x, alts in zip(lp["content"], ref.logprobs, top, strict=True):
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] == pytest.approx(x.logprob, abs=1e-6) and e["bytes"] == list(e["token"].encode())
        assert [t["token"] for t in e["top_logprobs"]] == alts
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx([v for _, v in x.top], abs=1e-6)
        values = [t["logprob"] for t in e["top_logprobs"]]
        assert values == sorted(values, reverse=True) and len(values) == 4
        assert all(set(t) == {"token", "logprob", "bytes"} and t["bytes"] == list(t["token"].encode())
                   for t in e["top_logprobs"])
    # logprobs without top_logprobs: no alternatives; no logprobs: null
    bare = client.post("/v1/chat/completions", json={**body, "top_logprobs": None}).json()["choices"][0]["logprobs"]
    assert [e["top_logprobs"] for e in bare["content"]] == [[]] * len(ref.tokens)
    plain = client.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None})
    assert plain.json()["choices"][0]["logprobs"] is None


def test_the_openai_client_reads_both_formats(setup):
    openai = pytest.importorskip("openai")
    _, client = setup
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    comp = api.completions.create(model="t1", prompt="France", max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs) > 0
    chat = api.chat.completions.create(model="t3", messages=[{"role": "user", "content": "Spain"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 and c.bytes is not None for c in content)


def test_a_stop_string_cuts_the_logprobs_with_the_text(setup):
    engine, client = setup
    body = {"model": "base", "prompt": "the movie was", "raw": True, "max_tokens": 16, "temperature": 0,
            "logprobs": 2}
    (free,) = engine.generate([GenerateRequest("base", "the movie was", raw=True, max_tokens=16, logprobs=2)])
    words = free.text.split()
    assert len(words) >= 4 and len(words[0]) > 1, free.text  # this random model's greedy output
    starts = [len(engine.detok.text(free.tokens[:i])) for i in range(len(free.tokens))]
    # two words at token boundaries: their tokens and any between get no entry; then a stop inside a word:
    # that word's token keeps its entry, as part of its text is returned
    for stop in [" " + " ".join(words[1:3]), words[0][1:]]:
        r = client.post("/v1/completions", json={**body, "stop": [stop]}).json()
        choice, cut = r["choices"][0], free.text.index(stop)
        assert choice["text"] == free.text[:cut]
        returned = sum(1 for s in starts if s < cut)  # the tokens whose text starts before the cut
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == returned
        assert lp["token_logprobs"] == pytest.approx([x.logprob for x in free.logprobs[:returned]], abs=1e-6)
        assert "".join(lp["tokens"]).startswith(choice["text"])
        chunks = stream(client, "/v1/completions", {**body, "stop": [stop]})
        assert [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]] == lp["tokens"]
        if stop[0] == " ":
            assert "".join(lp["tokens"]) == choice["text"] and returned < r["usage"]["completion_tokens"]
        else:
            assert lp["tokens"][-1] == " " + words[0]  # the whole string (after the prompt: its space first)


def test_a_stop_string_cuts_chat_logprobs_streamed_or_not(setup):
    engine, client = setup
    chat = {"model": "t1", "messages": [{"role": "user", "content": "Spain"}], "max_tokens": 16, "temperature": 0,
            "logprobs": True}
    (free,) = engine.generate([GenerateRequest("t1", "Spain", max_tokens=16, logprobs=0)])
    words = free.text.split()
    assert len(words) >= 4, free.text
    stop = " " + words[2]
    r = client.post("/v1/chat/completions", json={**chat, "stop": stop}).json()
    text, content = r["choices"][0]["message"]["content"], r["choices"][0]["logprobs"]["content"]
    assert text == free.text[:free.text.index(stop)] and "".join(e["token"] for e in content) == text
    assert len(content) < r["usage"]["completion_tokens"]
    streamed = [e for c in stream(client, "/v1/chat/completions", {**chat, "stop": stop}) if c["logprobs"]
                for e in c["logprobs"]["content"]]
    assert streamed == content


def assert_each_chunk_carries_its_tokens(texts: list[str], offsets: list[list[int]]) -> None:
    """``texts[n]``, ``offsets[n]``: chunk n's text and the text offsets of the entries it carries. Each chunk
    carries the entries of exactly the tokens whose text starts in it; the last one, any left."""
    flat = [o for offs in offsets for o in offs]
    carrying = [n for n in range(len(texts)) if texts[n] or offsets[n]]
    assert sum(1 for t in texts if t) >= 2, texts  # a stream of several text chunks, or this proves little
    at = 0
    for n in carrying[:-1]:
        end = at + len(texts[n])
        assert offsets[n] == [o for o in flat if at <= o < end], (n, at, end, offsets)
        at = end
    assert offsets[carrying[-1]] == [o for o in flat if o >= at]


@pytest.mark.parametrize("stop", [None, "a"])
def test_streamed_completion_logprobs_concatenate_to_the_non_streamed(setup, stop):
    _, client = setup
    body = {"model": "base", "prompt": "the movie was good", "raw": True, "max_tokens": 24, "temperature": 0,
            "logprobs": 2, "stop": stop}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = stream(client, "/v1/completions", body)
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert all(c["logprobs"] is not None for c in chunks if c["text"])
    joined = {k: [v for c in chunks if c["logprobs"] for v in c["logprobs"][k]] for k in COMPLETION_KEYS}
    assert joined == whole["logprobs"]
    assert_each_chunk_carries_its_tokens([c["text"] for c in chunks],
                                         [c["logprobs"]["text_offset"] if c["logprobs"] else [] for c in chunks])


def test_streamed_chat_logprobs_concatenate_to_the_non_streamed(setup):
    _, client = setup
    body = {"model": "t5", "messages": [{"role": "user", "content": "Italy"}], "max_tokens": 24, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    chunks = stream(client, "/v1/chat/completions", body)
    assert chunks[0]["delta"].get("role") == "assistant" and chunks[0]["logprobs"] is None
    texts = [c["delta"].get("content", "") for c in chunks]
    assert "".join(texts) == whole["message"]["content"]
    per_chunk = [c["logprobs"]["content"] if c["logprobs"] else [] for c in chunks]
    content = [e for entries in per_chunk for e in entries]
    assert content == whole["logprobs"]["content"]
    offsets = iter(offsets_of([e["token"] for e in content]))
    assert_each_chunk_carries_its_tokens(texts, [[next(offsets) for _ in entries] for entries in per_chunk])


BAD = [
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": "yes"}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),  # chat's flag is no count here
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
]


@pytest.mark.parametrize("path,extra,field", BAD)
def test_bad_logprobs_fields_are_422_naming_them(setup, path, extra, field):
    _, client = setup
    body = {"model": "t1", "max_tokens": 2, **extra}
    body.update({"prompt": "France"} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "France"}]})
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


def test_no_entry_for_eos(tokenizer):
    model = make_model("llama")
    engine = Engine(model, tokenizer)
    engine.add_base("base")
    (free,) = engine.generate([GenerateRequest("base", "the movie was", raw=True, max_tokens=12)])
    words = [t for t in free.tokens if tokenizer.convert_ids_to_tokens(t) not in (None, "[UNK]", "[PAD]")]
    later = [t for i, t in enumerate(free.tokens) if i > 0 and t in words and t not in free.tokens[:i]]
    if not later:
        pytest.skip("no word token after the first on this random model")
    eos = later[0]
    at = free.tokens.index(eos)
    tok = make_tokenizer()
    tok.eos_token = tok.convert_ids_to_tokens(eos)  # now that word ends the generation, as EOS
    engine = Engine(model, tok)
    engine.add_base("base")
    with TestClient(create_app(ServerState(engine, Scheduler(engine)))) as client:
        body = {"model": "base", "prompt": "the movie was", "raw": True, "max_tokens": 12, "temperature": 0,
                "logprobs": 1}
        r = client.post("/v1/completions", json=body).json()
        chunks = stream(client, "/v1/completions", body)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == at
    assert len(choice["logprobs"]["tokens"]) == at and choice["logprobs"]["token_logprobs"] == pytest.approx(
        [x.logprob for x in engine.generate([GenerateRequest("base", "the movie was", raw=True, max_tokens=12,
                                                             logprobs=1)])[0].logprobs], abs=1e-6)
    assert sum(len(c["logprobs"]["tokens"]) for c in chunks if c["logprobs"]) == at


# ---------------------------------------------------------------------------------------------- token strings
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's byte alphabet, no merges): one token per byte, so "é" is 2 tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    alphabet = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(rest)}
    vocab = {alphabet[b]: b for b in range(256)} | {"<|end|>": 256}
    inner = Tokenizer(models.BPE(vocab, []))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|end|>")


def test_a_token_inside_a_character_adds_nothing_and_the_one_that_ends_it_carries_it():
    tok = byte_level_tokenizer()
    text = "a é日!"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode())  # one token per byte
    lps = [TokenLogprob(t, -1.0 - i, [(t, -1.0 - i), (0xA9, -9.0), (256, -10.0)]) for i, t in enumerate(ids)]
    whole = Renderer(tok).extend(ids, lps)
    assert [e.token for e in whole] == ["a", " ", "", "é", "", "", "日", "!"]
    assert [e.offset for e in whole] == [0, 1, 2, 2, 3, 3, 3, 4]
    content = chat_format(whole)["content"]
    assert b"".join(bytes(c["bytes"]) for c in content) == text.encode()
    # alternatives in the token's place: 0xA9 ends the "é" begun by C3 or the "早" by E6 97; alone it is none
    assert [e.top[1][0] for e in whole] == ["", "", "", "é", "", "", "早", ""]  # E6 97 A9
    assert all(e.top[2][0] == "<|end|>" for e in whole)  # a special token by its name
    # a token at a time (streaming) renders the same entries
    stepwise = Renderer(tok)
    got = [e for k in range(1, len(ids) + 1) for e in stepwise.extend(ids[:k], lps[:k])]
    assert got == whole
    # a completion cut by max_tokens inside a character: the text ends with U+FFFD, which no token holds
    res = type("Res", (), {"tokens": ids[:5], "logprobs": lps[:5], "text": tok.decode(ids[:5])})()
    assert res.text == "a é\ufffd" and [e.token for e in entries_of(tok, res)] == ["a", " ", "", "é", ""]


def test_a_word_after_tokens_without_text_keeps_its_space(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(w) for w in [".", *["[PAD]"] * 12, "Paris", "[UNK]", "Rome"]]
    lps = [TokenLogprob(t, -1.0, []) for t in ids]
    strings = [e.token for e in Renderer(tokenizer).extend(ids, lps)]
    # the first token's string is what it adds after the prompt: a word-level tokenizer puts a space there
    assert strings == [" .", *[""] * 12, " Paris", "", " Rome"]
    assert "".join(strings) == Detokenizer(tokenizer).text(ids) == " . Paris Rome"


def test_a_stream_holds_back_a_stop_string_that_ends_in_an_unfinished_character(monkeypatch):
    # a byte-level BPE, one token per byte: while the stop " é" forms, the text ends with U+FFFD (the C3 of
    # "é" alone); the held-back text must be counted without it, or the " " before it goes out, and the
    # joined stream is "x " while the answer is "x"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from softprompt.engine import running
    from softprompt.model import prepare_frozen

    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=None, eos_token_id=256))
    prepare_frozen(model)
    script = list("x é!".encode())  # x, " ", C3, A9, "!"
    made = [0]  # tokens chosen so far for the request running now (one request at a time)

    def scripted(_model, hidden):  # the model "writes" the script: its chosen token is the script's next
        logits = torch.zeros(hidden.shape[0], 257)
        for i in range(hidden.shape[0]):
            logits[i, script[made[0] % len(script)]] = 5.0
            made[0] += 1
        return logits

    monkeypatch.setattr(running, "logits_from_hidden", scripted)
    engine = Engine(model, tok)
    engine.add_base("base")
    body = {"model": "base", "prompt": "ab", "raw": True, "max_tokens": 5, "temperature": 0, "logprobs": 1,
            "stop": [" é"]}
    with TestClient(create_app(ServerState(engine, Scheduler(engine), max_tokens=8))) as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]
        made[0] = 0
        chunks = stream(client, "/v1/completions", body)
    assert whole["text"] == "x" and whole["finish_reason"] == "stop"
    assert whole["logprobs"]["tokens"] == ["x"]
    assert "".join(c["text"] for c in chunks) == "x"
    joined = {k: [v for c in chunks if c["logprobs"] for v in c["logprobs"][k]] for k in COMPLETION_KEYS}
    assert joined == whole["logprobs"]
