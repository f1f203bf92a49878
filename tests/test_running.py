"""Continuous batching: rows joining and leaving a running batch get exactly what they get alone."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

from softprompt.engine import Engine, GenerateRequest
from softprompt.engine.running import RunningBatch
from softprompt.forward import slots as slots_mod
from softprompt.forward.slots import check_slots
from softprompt.model import prepare_frozen
from tests.conftest import VOCAB, make_model
from tests.test_engine import CAPS, SENT, SENT2, stored
from tests.test_prompt_table import reference_logits


def _engine(model, tok, tmp_path, **kw):
    engine = Engine(model, tok, max_batch_rows=kw.pop("rows", 8), **kw)
    for name, n, task, seed in [("sent", 3, SENT, 1), ("sent2", 6, SENT2, 2), ("caps", 2, CAPS, 3)]:
        engine.add_prompt(name, stored(tmp_path, model, tok, name, n, task, seed))
    engine.add_base("base")
    return engine


def _solo(engine, req):
    """The request alone, through the batch-at-a-time decode (no slots)."""
    saved = engine.backend._slots_problem
    engine.backend._slots_problem = "off for the reference"
    try:
        return engine.generate([req])[0]
    finally:
        engine.backend._slots_problem = saved


REQS = [GenerateRequest("caps", {"country": "France"}, max_tokens=5),
        GenerateRequest("sent", "the plot was bad and the film", max_tokens=7),
        GenerateRequest("base", "Country : Spain", raw=True, max_tokens=4),
        GenerateRequest("sent2", "a very bad movie", max_tokens=6, temperature=0.9, top_k=20, seed=5),
        GenerateRequest("caps", {"country": "Italy"}, max_tokens=9, logprobs=2)]


def _run_joining(engine, reqs, every: int = 2, **kw):
    """Admit one request every ``every`` steps while the others run (all at once for ``every=0``)."""
    batch = RunningBatch(engine, **kw)
    results, waiting = {}, list(range(len(reqs)))
    while waiting or len(batch):
        while waiting and (every == 0 or batch.steps % every == 0):
            if not batch.room(engine.prepare("generate", reqs[waiting[0]])):
                break
            i = waiting.pop(0)
            batch.admit(engine.prepare("generate", reqs[i]), done=lambda res, i=i: results.__setitem__(i, res))
            if every:
                break
        batch.step()
    assert batch.memory()["rows"] == 0 and batch.slots.nbytes() == 0  # everything given back
    return results, batch


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma3"])
def test_rows_joining_mid_flight_equal_solo_runs(arch, tmp_path, tokenizer):
    engine = _engine(make_model(arch), tokenizer, tmp_path)
    assert engine.continuous_problem() is None
    results, batch = _run_joining(engine, REQS)
    assert batch.peak_bytes > 0
    for i, req in enumerate(REQS):
        alone = _solo(engine, req)
        assert results[i].tokens == alone.tokens, (arch, req)
        assert (results[i].text, results[i].finish_reason) == (alone.text, alone.finish_reason)
    for got, ref in zip(results[4].logprobs, _solo(engine, REQS[4]).logprobs, strict=True):
        assert got.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in ref.top]


def test_chunked_prefill_reads_a_long_input_over_steps_with_the_same_result(tmp_path, tokenizer, monkeypatch):
    engine = _engine(make_model("llama"), tokenizer, tmp_path)
    long = GenerateRequest("sent", " ".join(["the movie was good"] * 6), max_tokens=4)
    widths, real = [], slots_mod.slot_forward

    def spy(model, slots, a, input_ids, counts, *rest):
        widths.append(sum(counts))
        return real(model, slots, a, input_ids, counts, *rest)

    monkeypatch.setattr("softprompt.engine.running.slot_forward", spy)
    results, batch = _run_joining(engine, [REQS[1], long, REQS[0]], every=1, prefill_chunk=5)
    assert len(engine.prepare("generate", long).rows[0].ids) > 20 and max(widths) <= 5  # never more per step
    for i, req in enumerate([REQS[1], long, REQS[0]]):
        assert results[i].tokens == _solo(engine, req).tokens


def test_padding_of_a_short_chunk_stays_within_the_models_positions(tmp_path, tokenizer, monkeypatch):
    # a row ending its input (1 token left) shares a prefill forward with a row joining (9 tokens): its 8
    # padding columns must not get positions past the model's 64 learned ones (GPT-2's wpe: an IndexError on
    # CPU, a device-side assert on CUDA); they take the row's last real position, as the batch path gives them
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=1, pad_token_id=0))
    prepare_frozen(model)
    engine = Engine(model, tokenizer, prefill_chunk=10)
    engine.add_base("base")
    words = "the movie was good the plot was very bad".split()
    long = GenerateRequest("base", " ".join((words * 7)[:61]), raw=True, max_tokens=3)  # 61 + 3 = 64 positions
    short = GenerateRequest("base", " ".join(words), raw=True, max_tokens=3)
    item_long, item_short = engine.prepare("generate", long), engine.prepare("generate", short)
    assert len(item_long.rows[0].ids) == 61 and len(item_short.rows[0].ids) >= 9
    seen, calls, real = [], [], slots_mod.slot_forward
    model.transformer.wpe.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].max())))

    def spy(model, slots, a, input_ids, counts, starts, *rest):
        calls.append((input_ids.shape[1], list(counts), list(starts)))
        return real(model, slots, a, input_ids, counts, starts, *rest)

    monkeypatch.setattr("softprompt.engine.running.slot_forward", spy)
    batch, results = RunningBatch(engine), {}
    batch.admit(item_long, done=lambda res: results.__setitem__(0, res))
    while batch.rows[0].fed + 10 < 61:  # the long row reads 10 tokens a step, up to its last one
        batch.step()
    batch.admit(item_short, done=lambda res: results.__setitem__(1, res))
    while len(batch):
        batch.step()
    # the case happened: one forward held the long row's last token beside 9 of the short row's
    assert (9, [1, 9], [60, 0]) in calls
    assert max(seen) < 64
    assert calls.count((9, [1, 9], [60, 0])) == 1 and (1, [1], [60]) not in calls  # not failed and run in halves
    for i, req in enumerate([long, short]):
        assert results[i].tokens == _solo(engine, req).tokens


def longrope_model(switch: int = 32):
    """A tiny llama whose rotary embedding switches to long factors once a forward passes ``switch`` positions
    (Phi-3 128k's longrope); its attention sharpened so the factors show in the tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
            "long_factor": [4.0, 16.0, 64.0, 256.0], "original_max_position_embeddings": switch}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         pad_token_id=0, bos_token_id=None, eos_token_id=1, rope_parameters=rope))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    prepare_frozen(model)
    return model


def test_a_row_beside_one_past_the_rope_switch_gets_what_it_gets_alone(tmp_path, tokenizer):
    # transformers picks a longrope embedding's factors per forward, from its largest position: a short row in
    # a forward with a row past 32 positions was read with the long factors (other tokens than alone)
    from softprompt.engine import ScoreRequest
    from softprompt.forward import rope_switch

    model = longrope_model()
    assert rope_switch(model) == 32 and rope_switch(make_model("llama")) is None
    engine = Engine(model, tokenizer)
    engine.add_base("base")
    words = "the movie was good the plot was very bad".split()
    long = GenerateRequest("base", " ".join((words * 5)[:40]), raw=True, max_tokens=8, logprobs=1)
    short = GenerateRequest("base", "the movie was good", raw=True, max_tokens=10, logprobs=1)
    alone, _ = _run_joining(engine, [short], every=0)
    together, _ = _run_joining(engine, [long, short], every=0)  # one prefill step: 40 and 4 tokens
    assert together[1].tokens == alone[0].tokens
    assert [x.logprob for x in together[1].logprobs] == pytest.approx([x.logprob for x in alone[0].logprobs],
                                                                       abs=1e-5)
    # a token's factors are those of its position: the long row's input read in chunks of 5 or all at once
    chunked, _ = _run_joining(engine, [long], every=0, prefill_chunk=5)
    assert chunked[0].tokens == together[0].tokens
    assert [x.logprob for x in chunked[0].logprobs] == pytest.approx([x.logprob for x in together[0].logprobs],
                                                                      abs=1e-5)
    # the batch-at-a-time path, and scoring: a row that may pass the switch does not share a forward
    assert _solo(engine, short).tokens == alone[0].tokens
    saved, engine.backend._slots_problem = engine.backend._slots_problem, "batch-at-a-time for this check"
    try:
        assert engine.generate([long, short])[1].tokens == alone[0].tokens
    finally:
        engine.backend._slots_problem = saved
    score = ScoreRequest("base", "the movie was", " good plot", raw=True)
    (solo,) = engine.score([score])
    beside = engine.score([ScoreRequest("base", long.input, " good", raw=True), score])[1]
    assert beside.logprob == pytest.approx(solo.logprob, abs=1e-5)


def test_slots_hold_text_only_and_the_prompt_is_shared_not_copied(tmp_path, tokenizer):
    model = make_model("llama")
    engine = Engine(model, tokenizer, max_batch_rows=8)
    engine.add_prompt("long", stored(tmp_path, model, tokenizer, "long", 120, CAPS, 1))
    batch = RunningBatch(engine)
    for c in ("France", "Spain", "Italy"):
        batch.admit(engine.prepare("generate", GenerateRequest("long", {"country": c}, max_tokens=3)))
    batch.step()
    mem = batch.memory()
    text = sum(len(r.ids) for r in batch.rows)
    assert mem["tokens"] == text and mem["rows"] == 3
    k = batch.slots.k[0]
    assert k.shape[0] == 3 and k.shape[2] < 120  # per row: its text's slots, not the 120 prompt slots
    assert all(r.prompt is engine.backend.table.get("long") for r in batch.rows)  # one prompt, by reference


def test_a_failing_row_fails_alone_and_the_others_match_solo(tmp_path, tokenizer, monkeypatch):
    engine = _engine(make_model("llama"), tokenizer, tmp_path)
    real = slots_mod.slot_forward

    def flaky(model, slots, a, input_ids, counts, starts, prompts):
        if any(p is None for p in prompts) and input_ids.shape[1] > 1:  # the base-model row's input
            raise RuntimeError("kernel blew up")
        return real(model, slots, a, input_ids, counts, starts, prompts)

    monkeypatch.setattr("softprompt.engine.running.slot_forward", flaky)
    reqs = [REQS[1], REQS[2], REQS[0]]  # the middle one has no prompt
    results, _ = _run_joining(engine, reqs, every=0, prefill_chunk=64)  # all three read in one forward
    assert isinstance(results[1], RuntimeError)
    monkeypatch.setattr("softprompt.engine.running.slot_forward", real)
    for i in (0, 2):
        assert results[i].tokens == _solo(engine, reqs[i]).tokens


def test_a_cancelled_row_leaves_at_the_next_step(tmp_path, tokenizer):
    engine = _engine(make_model("llama"), tokenizer, tmp_path)
    batch = RunningBatch(engine)
    gone, results = {"flag": False}, {}
    batch.admit(engine.prepare("generate", GenerateRequest("sent", "bad", max_tokens=20)),
                cancelled=lambda: gone["flag"], done=lambda r: results.__setitem__("cut", r))
    batch.admit(engine.prepare("generate", REQS[1]), done=lambda r: results.__setitem__("other", r))
    batch.step()
    batch.step()
    gone["flag"] = True
    batch.step()
    assert "cut" in results and len(results["cut"].tokens) <= 2 and len(batch) == 1
    while len(batch):
        batch.step()
    assert results["other"].tokens == _solo(engine, REQS[1]).tokens


def test_abort_fails_every_row_frees_the_slots_and_the_batch_serves_again(tmp_path, tokenizer):
    engine = _engine(make_model("llama"), tokenizer, tmp_path)
    batch, results = RunningBatch(engine), {}
    for i in (0, 1):
        batch.admit(engine.prepare("generate", REQS[i]), done=lambda r, i=i: results.__setitem__(i, r))
    batch.step()
    assert batch.memory()["bytes"] > 0
    error = RuntimeError("a step failed")
    batch.abort(error)
    assert results == {0: error, 1: error} and len(batch) == 0 and batch.memory()["bytes"] == 0
    batch.admit(engine.prepare("generate", REQS[1]), done=lambda r: results.__setitem__("again", r))
    while len(batch):
        batch.step()
    assert results["again"].tokens == _solo(engine, REQS[1]).tokens


def test_a_prompt_reloaded_mid_generation_changes_only_later_requests(tmp_path, tokenizer):
    model = make_model("llama")
    engine = _engine(model, tokenizer, tmp_path)
    req = GenerateRequest("caps", {"country": "France"}, max_tokens=8)
    before = _solo(engine, req)
    batch, results = RunningBatch(engine), {}
    batch.admit(engine.prepare("generate", req), done=lambda r: results.__setitem__("old", r))
    batch.step()
    engine.add_prompt("caps", stored(tmp_path / "v2", model, tokenizer, "caps", 4, CAPS, 9))
    batch.admit(engine.prepare("generate", req), done=lambda r: results.__setitem__("new", r))
    while len(batch):
        batch.step()
    assert results["old"].tokens == before.tokens
    assert results["new"].tokens == _solo(engine, req).tokens


def _windowed(kind: str):
    torch.manual_seed(0)
    if kind == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                               max_position_embeddings=256, sliding_window=5,
                               layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=1)
        model = Gemma3ForCausalLM(cfg)
    else:
        cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, sliding_window=6,
                            max_position_embeddings=256, pad_token_id=0, eos_token_id=1)
        model = MistralForCausalLM(cfg)
    prepare_frozen(model)
    return model


@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
def test_sliding_windows_shorter_than_the_input_match_the_uncached_reference(kind, tmp_path, tokenizer):
    model = _windowed(kind)
    engine = _engine(model, tokenizer, tmp_path)
    assert engine.continuous_problem() is None
    req = GenerateRequest("sent", "the plot was bad and the film was very good", max_tokens=6)
    res = engine.generate([req, REQS[0]])[0]
    prompt = engine.backend.table.get("sent")
    assert prompt is not None
    ids = list(engine.prepare("generate", req).rows[0].ids)
    emb = stored(tmp_path / "ref", model, tokenizer, "sent", 3, SENT, 1).tensors["prompt_embeddings"]
    for t in res.tokens:
        with torch.no_grad():
            assert int(reference_logits(model, emb, ids)[-1].argmax()) == t
        ids.append(t)


def test_a_model_whose_attention_slots_get_wrong_is_served_batch_at_a_time(tmp_path, tokenizer, monkeypatch):
    model = _windowed("gemma3")
    real = slots_mod._allowed
    monkeypatch.setattr(slots_mod, "_allowed", lambda step, q, p, t, window, dev: real(step, q, p, t, None, dev))
    # (slot attention that forgets the sliding window)
    assert "differs" in check_slots(model)
    engine = _engine(model, tokenizer, tmp_path)
    assert engine.continuous_problem() is not None
    req = GenerateRequest("sent", "the plot was bad and the film was very good", max_tokens=4)
    assert engine.generate([req])[0].tokens == _solo(engine, req).tokens  # the batch path still serves it


@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
def test_the_batch_at_a_time_path_keeps_each_rows_window_on_a_sliding_window_model(tmp_path, tokenizer, kind):
    """Where slot attention cannot serve a model (attention sinks, say), generations ran in left-padded batches:
    transformers counts a sliding window in cache columns, so padding shifted a shorter row's window over its
    prompt and its tokens differed from the same request run alone."""
    engine = _engine(_windowed(kind), tokenizer, tmp_path)
    engine.backend._slots_problem = "off: the batch-at-a-time path is under test"
    reqs = [GenerateRequest("sent", "the plot was bad and the film was very good", max_tokens=4),
            GenerateRequest("caps", {"country": "Italy"}, max_tokens=4),
            GenerateRequest("base", "the movie", raw=True, max_tokens=4),
            GenerateRequest("sent", "a very bad movie", max_tokens=4)]
    together = engine.generate(reqs)
    for req, res in zip(reqs, together, strict=True):
        assert res.tokens == engine.generate([req])[0].tokens, req


def test_no_forward_runs_more_rows_than_the_engine_allows(tmp_path, tokenizer, monkeypatch):
    engine = _engine(make_model("llama"), tokenizer, tmp_path, rows=2)
    widths, real = [], slots_mod.slot_forward

    def spy(model, slots, a, input_ids, *rest):
        widths.append(input_ids.shape[0])
        return real(model, slots, a, input_ids, *rest)

    monkeypatch.setattr("softprompt.engine.running.slot_forward", spy)
    results, batch = _run_joining(engine, REQS, every=0, max_rows=8)  # asks for 8: the engine's 2 win
    assert batch.max_rows == 2 and max(widths) == 2 and len(results) == len(REQS)


def test_an_end_of_turn_id_in_the_generation_config_ends_the_answer(tmp_path, tokenizer):
    # chat models end a turn with their own token (Gemma's <end_of_turn>, Llama 3's <|eot_id|>), listed in the
    # generation config beside the tokenizer's EOS; generation stopped only at the EOS and ran on to max_tokens
    from softprompt.evaluate import generate_texts

    model = make_model("llama")
    req = GenerateRequest("base", "the movie was", raw=True, max_tokens=8)
    free = _engine(model, tokenizer, tmp_path / "a").generate([req])[0]
    k = next((k for k in range(1, len(free.tokens)) if free.tokens[k] not in free.tokens[:k]), None)
    if k is None:
        pytest.skip("the greedy answer repeats one token on this random model")
    text_before = generate_texts(model, tokenizer, None, ["the movie was"], 8, batch_size=1, stop=None)[0]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, free.tokens[k]]
    engine = _engine(model, tokenizer, tmp_path / "b")
    assert engine.end_ids == (tokenizer.eos_token_id, free.tokens[k])
    results, _ = _run_joining(engine, [req], every=0)
    for res in (results[0], _solo(engine, req)):  # the continuous scheduler and the batch-at-a-time decode
        assert (res.tokens, res.finish_reason) == (free.tokens[:k], "stop")
    text_after = generate_texts(model, tokenizer, None, ["the movie was"], 8, batch_size=1, stop=None)[0]
    assert text_after == tokenizer.decode(free.tokens[:k], skip_special_tokens=True) != text_before


def test_a_row_that_left_non_finite_keys_in_its_slot_does_not_poison_the_next_row(tmp_path, tokenizer, monkeypatch):
    """Columns past a row's length are masked, but a masked NaN still poisons probs @ values (0 x NaN): the
    slot a row with non-finite keys/values (an fp16 overflow) left was handed to the next row as it was."""
    engine = _engine(make_model("llama"), tokenizer, tmp_path)
    long_req = GenerateRequest("sent", "the plot was bad and the film was very bad", max_tokens=2)
    short = GenerateRequest("caps", {"country": "Italy"}, max_tokens=4)
    real = RunningBatch._remove

    def poisoned(self, i):  # the leaving row's keys/values went non-finite
        for k, v in zip(self.slots.k, self.slots.v, strict=True):
            if k is not None:
                k[i, :, :self.rows[i].n] = float("nan")
                v[i, :, :self.rows[i].n] = float("nan")
        real(self, i)

    monkeypatch.setattr(RunningBatch, "_remove", poisoned)
    batch = RunningBatch(engine)
    got = {}
    # a row that holds the buffers (no shrink to nothing) and reads past the short row's end while both decode
    keep = GenerateRequest("base", "the movie was great and the plot was good and the film is", raw=True,
                           max_tokens=24)
    batch.admit(engine.prepare("generate", keep), done=lambda res: got.__setitem__("keep", res))
    batch.admit(engine.prepare("generate", long_req), done=lambda res: got.__setitem__("long", res))
    while "long" not in got:
        batch.step()
    batch.admit(engine.prepare("generate", short), done=lambda res: got.__setitem__("short", res))
    while len(batch):
        batch.step()
    for name, req in (("keep", keep), ("short", short)):
        alone = _solo(engine, req)
        assert not isinstance(got[name], BaseException), got[name]
        assert (got[name].tokens, got[name].finish_reason) == (alone.tokens, alone.finish_reason), name


@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
def test_a_prompt_longer_than_the_sliding_window_is_served_in_mixed_batches(tmp_path, tokenizer, kind):
    """A sliding layer's cache keeps the last window - 1 keys of a longer prompt: stacking every loaded prompt
    into the table then failed ("expanded size ... must match"), so every mixed batch did once one was loaded."""
    from softprompt.engine import ClassifyRequest, ScoreRequest

    engine = _engine(_windowed(kind), tokenizer, tmp_path)  # sent2's 6 tokens pass both windows (5 and 6)
    engine.backend._slots_problem = "off: the batch-at-a-time path is under test"
    texts = ["the plot was bad and the film was very good", "a very bad movie", "good"]
    mixed = [ClassifyRequest(t, x) for t in ("sent", "sent2") for x in texts]
    for req, res in zip(mixed, engine.classify(mixed), strict=True):
        alone = engine.classify([req])[0]
        assert res.label == alone.label and all(res.scores[k] == pytest.approx(alone.scores[k], abs=1e-5)
                                                for k in alone.scores), req
    scores = [ScoreRequest(t, x, " positive") for t in ("sent", "sent2", "caps") for x in texts[:2]
              if t != "caps"] + [ScoreRequest("caps", {"country": "Italy"}, " Rome")]
    for req, res in zip(scores, engine.score(scores), strict=True):
        assert res.logprob == pytest.approx(engine.score([req])[0].logprob, abs=1e-5), req
    gens = [GenerateRequest(t, x, max_tokens=3) for t in ("sent", "sent2") for x in texts]
    for req, res in zip(gens, engine.generate(gens), strict=True):
        assert res.tokens == engine.generate([req])[0].tokens, req


def test_a_chat_task_ends_its_answer_at_its_templates_end_of_turn_token(tmp_path):
    # a chat prompt is trained to end its answer with the template's end-of-turn marker (ChatML's <|im_end|>),
    # which need not be the model's EOS (ChatML on a base model): generation ran past it into invented turns
    from softprompt.data import ChatFormat, turn_end_ids
    from softprompt.evaluate import generate_texts
    from tests.conftest import WORDS, make_tokenizer
    from tests.test_chat import TEMPLATE

    model = make_model("llama")
    text = "Classify sentiment .Review a good film .Sentiment"
    req = GenerateRequest("chat", text, raw=True, max_tokens=8)

    def chat_engine(tok, template):
        engine = Engine(model, tok, max_batch_rows=8)
        engine.add_base("chat", ChatFormat(chat_template=template))
        return engine

    free = chat_engine(make_tokenizer(), TEMPLATE).generate([req])[0]
    prompt_ids = make_tokenizer()(text, add_special_tokens=False)["input_ids"]
    k = next((k for k in range(1, len(free.tokens)) if free.tokens[k] not in free.tokens[:k] + prompt_ids), None)
    if k is None:
        pytest.skip("the greedy answer repeats its tokens on this random model")
    marker = WORDS[free.tokens[k]]
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [marker]})  # a special token, as <|im_end|> is
    template = TEMPLATE.replace("[EOS]", marker)  # an assistant turn ends with it, not with the EOS
    assert turn_end_ids(tok, template) == (free.tokens[k],) and turn_end_ids(tok, TEMPLATE) == (tok.eos_token_id,)
    assert turn_end_ids(make_tokenizer(), template) == ()  # the same word as plain text is no end id
    engine = chat_engine(tok, template)
    results, _ = _run_joining(engine, [req], every=0)
    for res in (results[0], _solo(engine, req)):  # the continuous scheduler and the batch-at-a-time decode
        assert (res.tokens, res.finish_reason) == (free.tokens[:k], "stop")
    # a task that is not a chat task is not cut there
    engine.add_base("raw")
    assert engine.generate([GenerateRequest("raw", text, raw=True, max_tokens=8)])[0].tokens == free.tokens
    # evaluation's generation of a chat task (evaluate_chat passes the same ids)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert generate_texts(model, tok, None, [ids], 8, 1, stop=None, end_ids=turn_end_ids(tok, template)) == [
        tok.decode(free.tokens[:k], skip_special_tokens=True)]


@pytest.mark.parametrize("special", [True, False])
def test_a_chat_completion_on_the_base_model_ends_at_the_tokenizers_end_of_turn(special):
    # a chat completion on a task without a chat format renders the conversation with the tokenizer's own chat
    # template; its end of turn (a special token, or a plain-text marker) was not the model's EOS, so the reply
    # ran on into invented turns (Qwen2.5 base: EOS <|endoftext|>, ChatML's <|im_end|> ends a turn)
    pytest.importorskip("fastapi")
    import json

    from fastapi.testclient import TestClient

    from softprompt.server import Scheduler, ServerState, create_app
    from tests.conftest import WORD_IDS, make_tokenizer
    from tests.test_chat import TEMPLATE

    model, tok = make_model("llama"), make_tokenizer()
    if special:
        tok.add_special_tokens({"additional_special_tokens": ["Madrid"]})
    tok.chat_template = TEMPLATE.replace("[EOS]", "Madrid")  # an assistant turn ends with "Madrid"

    def always_the_marker(module, inputs, out):  # the model ends its turn at once
        out = out.clone()
        out[..., WORD_IDS["Madrid"]] += 100.0
        return out

    model.lm_head.register_forward_hook(always_the_marker)
    engine = Engine(model, tok, max_batch_rows=8)
    engine.add_base("base")
    body = {"model": "base", "messages": [{"role": "user", "content": "a good film"}], "max_tokens": 6,
            "temperature": 0}
    with TestClient(create_app(ServerState(engine, Scheduler(engine), max_tokens=16))) as client:
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        lines = client.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
    # the reply is what comes before the marker: nothing (a plain-text marker's stop keeps the space before it)
    assert (whole["message"]["content"].strip(), whole["finish_reason"]) == ("", "stop")
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # a completion of the same task is not a conversation: not cut there
    raw = engine.generate([GenerateRequest("base", "a good film", raw=True, max_tokens=3)])[0]
    assert raw.finish_reason == "length"


def test_a_completion_keeps_the_leading_space_a_sentencepiece_tokenizer_drops_at_the_start(tmp_path):
    # a SentencePiece tokenizer (Llama 2, Mistral: Metaspace) drops the leading space of the first token it
    # decodes: the generated ids decoded alone gave "Paris" for "▁Paris", and prompt + completion read "isParis"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from softprompt.engine.detokenize import Detokenizer
    from tests.conftest import VOCAB

    words = ["[PAD]", "[EOS]", "[UNK]", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "▁a"]
    words += [f"▁w{i}" for i in range(VOCAB - len(words))]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    inner.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    paris = tok.convert_tokens_to_ids("▁Paris")
    assert tok.decode([paris]) == "Paris" and Detokenizer(tok).text([paris]) == " Paris"
    engine = Engine(make_model("llama"), tok, max_batch_rows=8)
    engine.add_base("base")
    prompt = "The capital of France is"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    req = GenerateRequest("base", prompt, raw=True, max_tokens=6)
    results, _ = _run_joining(engine, [req], every=0)
    for res in (results[0], _solo(engine, req)):  # the continuous scheduler and the batch-at-a-time decode
        assert res.text.startswith(" ") and prompt + res.text == tok.decode(ids + res.tokens, skip_special_tokens=True)
    # a stop string that starts with the space matches at the very start
    first = tok.convert_ids_to_tokens(results[0].tokens[0]).replace("▁", " ")
    stopped = engine.generate([GenerateRequest("base", prompt, raw=True, max_tokens=6, stop=[first])])[0]
    assert (stopped.text, stopped.finish_reason) == ("", "stop")


def test_completion_text_only_extends_as_tokens_arrive_even_with_a_clean_up_tokenizer():
    # clean_up_tokenization_spaces rewrote text already decoded ("x '" became "x's" once "s" followed): a stream
    # had sent "x '" and the final text was "x's"; the engine's text never goes through the clean-up
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from softprompt.engine.detokenize import Detokenizer

    words = ["[PAD]", "[EOS]", "[UNK]", "x", "'", "s", "a"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]",
                                  clean_up_tokenization_spaces=True)
    ids = [3, 4, 5, 4, 3]
    assert tok.decode(ids[:3]) == "x's"  # what the clean-up makes of it
    texts = [Detokenizer(tok).text(ids[:k]) for k in range(len(ids) + 1)]
    assert all(b.startswith(a) for a, b in zip(texts[:-1], texts[1:], strict=True)) and texts[-1] == " x ' s ' x"


def test_a_chat_task_whose_template_ends_a_turn_with_plain_text_stops_there(tmp_path):
    # a frozen base model cannot learn a new special token: with a template whose end-of-turn marker is plain
    # text in its vocabulary (ChatML's <|im_end|> on a tokenizer without it), the prompt learns to write it, and
    # generation ran past it into invented turns
    from softprompt.data import ChatFormat, turn_end_ids, turn_end_text
    from tests.conftest import WORDS, make_tokenizer
    from tests.test_chat import TEMPLATE

    model, tok = make_model("llama"), make_tokenizer()
    text = "Classify sentiment .Review a good film .Sentiment"
    engine = Engine(model, tok, max_batch_rows=8)
    engine.add_base("raw")
    free = engine.generate([GenerateRequest("raw", text, raw=True, max_tokens=8)])[0]
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    k = next((k for k in range(1, len(free.tokens)) if free.tokens[k] not in free.tokens[:k] + prompt_ids
              and free.tokens[k] > 2), None)
    if k is None:
        pytest.skip("the greedy answer repeats its tokens on this random model")
    marker = WORDS[free.tokens[k]]
    template = TEMPLATE.replace("[EOS]", marker)
    assert turn_end_ids(tok, template) == () and turn_end_text(tok, template) == marker
    assert turn_end_text(tok, TEMPLATE) is None  # [EOS] is a special token: an end id, no stop string
    engine.add_base("chat", ChatFormat(chat_template=template))
    assert engine.turn_stops("chat") == [marker] and engine.turn_stops("raw") == []
    req = GenerateRequest("chat", text, raw=True, max_tokens=8)
    want = free.text[:free.text.index(marker)]  # cut where the marker starts, as any stop string
    results, _ = _run_joining(engine, [req], every=0)
    for res in (results[0], _solo(engine, req)):  # the continuous scheduler and the batch-at-a-time decode
        assert (res.text, res.finish_reason) == (want, "stop")
    # the server streams what it returns: the marker's first characters are held back, never sent
    pytest.importorskip("fastapi")
    import json

    from fastapi.testclient import TestClient

    from softprompt.server import Scheduler, ServerState, create_app

    msgs = [{"role": "system", "content": "sentiment"}, {"role": "user", "content": "a good film"}]
    body = {"model": "chat", "messages": msgs, "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(ServerState(engine, Scheduler(engine), max_tokens=16))) as client:
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    streamed = "".join(json.loads(ln)["choices"][0]["delta"].get("content", "") for ln in lines if
                       json.loads(ln)["choices"])
    assert whole["message"]["content"] == streamed == want and whole["finish_reason"] == "stop"
