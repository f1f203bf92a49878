"""The engine: mixed-task batches with cached prompts equal one-row uncached runs; ensembles; errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from softprompt import forward
from softprompt.engine import (
    ClassifyRequest,
    Engine,
    GenerateRequest,
    RequestError,
    ScoreRequest,
    TooLongError,
    UnknownTaskError,
)
from softprompt.methods import build_method
from softprompt.store import load_prompt, save_prompt
from tests.conftest import make_model
from tests.test_prompt_table import reference_logits

SENT = {"template": "Review: {text}\nSentiment:", "target_field": "label",
        "verbalizer": {"positive": "positive", "negative": "negative"}}
SENT2 = {"template": "Classify sentiment . {text} :", "target_field": "label",
         "verbalizer": {"negative": "not good", "positive": "very good"}}  # multi-token labels, other order
CAPS = {"template": "Country : {country} Capital :", "target_field": "capital", "verbalizer": None}
TEXTS = ["the movie was great", "a bad plot", "very awful film", "the film is good", "plot was not bad"]


def stored(tmp_path, model, tok, name, n, task, seed):
    torch.manual_seed(seed)
    method = build_method("prompt_tuning", {"num_virtual_tokens": n, "init": "random", "init_scale": 1.0,
                                            "seed": seed}, model, tok)
    save_prompt(tmp_path / name, method, model, task=task)
    return load_prompt(tmp_path / name, model)


@pytest.fixture(params=["llama", "gpt2", "qwen2"])
def setup(request, tmp_path, tokenizer):
    model = make_model(request.param)
    engine = Engine(model, tokenizer, max_batch_rows=4)
    prompts = {}
    for name, n, task, seed in [("sent", 3, SENT, 1), ("sent2", 6, SENT2, 2), ("caps", 2, CAPS, 3),
                                ("sent3", 5, SENT, 4)]:
        prompts[name] = stored(tmp_path, model, tokenizer, name, n, task, seed)
        engine.add_prompt(name, prompts[name])
    engine.add_base("base")
    return model, tokenizer, engine, {k: v.tensors["prompt_embeddings"] for k, v in prompts.items()}


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def ref_logprob(model, prompt, ids, start):
    """Uncached, unbatched: sum of log p(ids[t]) for t >= start, prompt prepended to inputs_embeds."""
    with torch.no_grad():
        lp = torch.log_softmax(reference_logits(model, prompt, ids).double(), -1)
    return sum(float(lp[t - 1, ids[t]]) for t in range(start, len(ids)))


def ref_label_scores(model, tok, prompt, task, text):
    src = ids_of(tok, task["template"].format(text=text))
    return {lab: ref_logprob(model, prompt, src + ids_of(tok, " " + v), len(src))
            for lab, v in task["verbalizer"].items()}


def test_mixed_classification_equals_single_uncached(setup):
    model, tok, engine, prompts = setup
    reqs = [ClassifyRequest(task, text) for text in TEXTS for task in ("sent", "sent2", "sent3")]
    results = engine.classify(reqs)
    for req, res in zip(reqs, results, strict=True):
        task = SENT2 if req.task == "sent2" else SENT
        ref = ref_label_scores(model, tok, prompts[req.task], task, req.input)
        assert res.scores == pytest.approx(ref, abs=1e-4)
        assert res.label == max(ref, key=ref.get)
        assert sum(res.probs.values()) == pytest.approx(1.0)
        assert res.votes is None


def test_mixed_generation_equals_single_uncached_greedy(setup):
    model, tok, engine, prompts = setup
    reqs = [GenerateRequest("caps", {"country": "France"}, max_tokens=4),
            GenerateRequest("sent", "the plot", max_tokens=3),
            GenerateRequest("base", "Country : Spain", raw=True, max_tokens=5),
            GenerateRequest("sent2", "a very bad movie", max_tokens=4)]
    results = engine.generate(reqs)
    templates = {"caps": CAPS, "sent": SENT, "sent2": SENT2}
    for req, res in zip(reqs, results, strict=True):
        text = req.input if req.raw else templates[req.task]["template"].format(
            **(req.input if isinstance(req.input, dict) else {"text": req.input}))
        ids = ids_of(tok, text)
        prompt = prompts.get(req.task)
        n = len(ids)
        for _ in range(req.max_tokens):
            with torch.no_grad():
                nxt = int(reference_logits(model, prompt, ids)[-1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
        assert res.tokens == ids[n:] and res.prompt_tokens == n
        assert res.finish_reason == ("length" if len(res.tokens) == req.max_tokens else "stop")


def test_score_equals_single_uncached(setup):
    model, tok, engine, prompts = setup
    reqs = [ScoreRequest("sent", "good film", " positive"), ScoreRequest("caps", {"country": "Italy"}, " Rome"),
            ScoreRequest("base", "the movie", " was very good", raw=True)]
    for req, res in zip(reqs, engine.score(reqs), strict=True):
        text = req.input if req.raw else {"sent": SENT, "caps": CAPS}[req.task]["template"].format(
            **(req.input if isinstance(req.input, dict) else {"text": req.input}))
        src, cont = ids_of(tok, text), ids_of(tok, req.continuation)
        assert res.logprob == pytest.approx(ref_logprob(model, prompts.get(req.task), src + cont, len(src)), abs=1e-4)
        assert res.tokens == cont and len(res.token_logprobs) == len(cont)


def test_ensemble_mean_and_vote_combine_members_in_one_call(setup):
    _, _, engine, _ = setup
    engine.add_ensemble("ens", ["sent", "sent2", "sent3"], "mean")
    engine.add_ensemble("ens_vote", ["sent", "sent2", "sent3"], "vote")
    singles = {t: engine.classify([ClassifyRequest(t, x) for x in TEXTS]) for t in ("sent", "sent2", "sent3")}
    mixed = engine.classify([ClassifyRequest(t, x) for x in TEXTS for t in ("ens", "ens_vote")])
    for i in range(len(TEXTS)):
        mean_res, vote_res = mixed[2 * i], mixed[2 * i + 1]
        members = [singles[t][i] for t in ("sent", "sent2", "sent3")]
        for lab in ("positive", "negative"):
            assert mean_res.probs[lab] == pytest.approx(sum(m.probs[lab] for m in members) / 3, abs=1e-6)
        assert mean_res.label == max(mean_res.probs, key=mean_res.probs.get)
        picks = [m.label for m in members]
        assert vote_res.votes == {lab: picks.count(lab) for lab in ("positive", "negative")}
        assert vote_res.label == max(set(picks), key=picks.count)
        # the ensemble's label log-likelihood is the log of its members' mean likelihood (a mixture)
        for lab in ("positive", "negative"):
            mixture = math.log(sum(math.exp(m.scores[lab]) for m in members) / 3)
            assert mean_res.scores[lab] == pytest.approx(mixture, abs=1e-5)
            assert vote_res.scores[lab] == pytest.approx(mixture, abs=1e-5)


def test_an_ensembles_label_scores_equal_its_score_of_the_label_continuation(setup):
    _, _, engine, _ = setup
    engine.add_ensemble("pair", ["sent", "sent3"])  # same template and verbalizer: the label is one continuation
    for text in TEXTS:
        res = engine.classify([ClassifyRequest("pair", text)])[0]
        scored = engine.score([ScoreRequest("pair", text, " " + lab) for lab in ("positive", "negative")])
        assert res.scores == pytest.approx({"positive": scored[0].logprob, "negative": scored[1].logprob}, abs=1e-4)


def test_an_ensembles_token_logprobs_are_the_mixtures_and_sum_to_its_logprob(setup):
    _, _, engine, _ = setup
    engine.add_ensemble("pair", ["sent", "sent3"])
    cont = " very good plot"
    (mix,) = engine.score([ScoreRequest("pair", "the movie", cont)])
    members = engine.score([ScoreRequest(m, "the movie", cont) for m in ("sent", "sent3")])
    assert sum(mix.token_logprobs) == pytest.approx(mix.logprob, abs=1e-9)
    # token i under the mixture given the tokens before it: log of the members' mean prefix probability, differenced
    prefix = [math.log(sum(math.exp(sum(m.token_logprobs[:i + 1])) for m in members) / 2)
              for i in range(len(mix.tokens))]
    steps = [prefix[0]] + [prefix[i] - prefix[i - 1] for i in range(1, len(prefix))]
    assert mix.token_logprobs == pytest.approx(steps, abs=1e-5)


def test_sampling_is_reproducible_per_request_whatever_the_batch(setup):
    _, _, engine, _ = setup
    req = GenerateRequest("caps", {"country": "Spain"}, max_tokens=6, temperature=1.0, top_k=20, seed=11)
    alone = engine.generate([req])[0]
    crowd = engine.generate([GenerateRequest("sent", "bad", max_tokens=2), req,
                             GenerateRequest("caps", {"country": "Italy"}, max_tokens=6, temperature=0.7, seed=3)])
    assert crowd[1].tokens == alone.tokens
    other = engine.generate([GenerateRequest("caps", {"country": "Spain"}, max_tokens=6, temperature=1.0,
                                             top_k=20, seed=12)])[0]
    assert other.tokens != alone.tokens or len(set(alone.tokens)) == 1


def test_stop_strings_cut_the_text(setup):
    _, _, engine, _ = setup
    free = engine.generate([GenerateRequest("base", "the movie was", raw=True, max_tokens=8)])[0]
    words = free.text.split()
    if len(words) < 2:
        pytest.skip("greedy output too short on this random model")
    stop = words[-1]
    res = engine.generate([GenerateRequest("base", "the movie was", raw=True, max_tokens=8, stop=["zzz", stop])])[0]
    assert res.finish_reason == "stop" and res.text == free.text[:free.text.index(stop)]
    assert len(res.tokens) <= len(free.tokens)


def test_errors_are_specific(setup):
    _, _, engine, _ = setup
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
        engine.classify([ClassifyRequest("nope", "x")])
    with pytest.raises(RequestError, match="not a classification task"):
        engine.classify([ClassifyRequest("caps", {"country": "France"})])
    with pytest.raises(RequestError, match="lacks fields"):
        engine.generate([GenerateRequest("caps", {"land": "France"})])
    with pytest.raises(RequestError, match="max_tokens must be"):
        engine.generate([GenerateRequest("caps", "France", max_tokens=0)])
    with pytest.raises(RequestError, match="top_p"):
        engine.generate([GenerateRequest("caps", "France", top_p=0)])
    with pytest.raises(TooLongError, match="tokens"):
        engine.generate([GenerateRequest("sent", " ".join(["good"] * 300))])
    # a max_tokens that leaves no room for the input: the error says so (it read "at most 0 fit" and no more)
    ctx = engine.context
    with pytest.raises(TooLongError, match=r"virtual tokens and max_tokens \d+ are taken: ask for fewer tokens"):
        engine.generate([GenerateRequest("caps", "France", max_tokens=ctx - 3)])
    engine.add_ensemble("ens", ["sent", "sent3"])
    with pytest.raises(RequestError, match="ensemble"):
        engine.generate([GenerateRequest("ens", "good")])
    with pytest.raises(RequestError, match="same labels"):
        engine.add_ensemble("bad", ["sent", "caps"])


def test_a_verbalizer_whose_label_can_never_win_is_refused_when_the_task_is_loaded(tmp_path, tokenizer):
    """A label scores its tokens' summed log-probability: " positive ." ([positive, .]) always scores below
    " positive", and of two labels with the same tokens the first always wins. Training refuses such a verbalizer;
    the engine served it (eval --prompt, a store entry, the server), and the longer label was never chosen."""
    from softprompt.data import TaskFormat

    model = make_model("llama")
    engine = Engine(model, tokenizer)
    for verbalizer, why in (({"positive": "positive", "negative": "positive ."}, "can never be predicted"),
                            ({"positive": "yes", "negative": "no"}, "tokenize alike")):  # both [UNK]
        bad = {**SENT, "verbalizer": verbalizer}
        entry = stored(tmp_path, model, tokenizer, f"bad{len(why)}", 3, bad, 1)
        with pytest.raises(RequestError, match=f"task 'bad': --verbalizer: labels .* {why}"):
            engine.add_prompt("bad", entry)
        fmt = TaskFormat(bad["template"], "label", verbalizer)
        with pytest.raises(RequestError, match=why):
            engine.add_base("base", fmt)
        with pytest.raises(RequestError, match=why):
            engine.add_kv("kv", forward.compute_prompt_kv(model, torch.randn(2, 32)), fmt)
    assert engine.task_names() == []  # nothing half-loaded
    engine.add_prompt("sent", stored(tmp_path, model, tokenizer, "good", 3, SENT, 1))  # the usual labels load


def test_unload_keeps_prompts_other_tasks_use(setup):
    _, _, engine, _ = setup
    engine.add_ensemble("ens", ["sent", "sent3"])
    before = engine.classify([ClassifyRequest("ens", "great")])[0]
    engine.unload("sent")
    assert "sent" not in engine.task_names() and "sent" in engine.backend.table  # still an ensemble member
    after = engine.classify([ClassifyRequest("ens", "great")])[0]  # served as before: its member's prompt kept
    assert after.label == before.label and after.probs == pytest.approx(before.probs, abs=1e-6)
    engine.unload("ens")
    assert "sent" not in engine.backend.table and "sent3" in engine.backend.table
    with pytest.raises(UnknownTaskError):
        engine.classify([ClassifyRequest("sent", "great")])


def test_truncation_only_when_asked(setup):
    model, tok, engine, _ = setup
    engine.max_input_tokens = 8
    long = "the movie was very very good and the plot was great"
    with pytest.raises(TooLongError, match="at most"):
        engine.classify([ClassifyRequest("sent", long)])
    engine.truncate = True
    res = engine.classify([ClassifyRequest("sent", long)])[0]
    assert math.isfinite(res.scores["positive"])
    # the cut keeps the end of the rendered text (where the label is predicted), after the prompt's lead ids
    # (the BOS, when the tokenizer has one): 8 tokens, less the 1-token label that training counts after them
    lead = engine.lead_ids("sent")
    ids = tok(SENT["template"].format(text=long), add_special_tokens=False)["input_ids"]
    (row,) = engine.prepare("classify", ClassifyRequest("sent", long)).rows
    assert len(ids) > 7 and row.ids == lead + ids[len(ids) - (7 - len(lead)):]


def test_on_token_sees_every_prefix_of_each_request_and_its_logprobs(setup):
    _, _, engine, _ = setup
    seen: dict[int, list[tuple[list[int], list | None]]] = {}
    reqs = [GenerateRequest("caps", {"country": "France"}, max_tokens=4, logprobs=2),
            GenerateRequest("sent", "bad", max_tokens=3)]
    results = engine.generate(reqs, on_token=lambda i, toks, lps: seen.setdefault(i, []).append(
        (list(toks), None if lps is None else list(lps))))
    for i, res in enumerate(results):
        assert seen.get(i, []) == [(res.tokens[:k], None if res.logprobs is None else res.logprobs[:k])
                                   for k in range(1, len(res.tokens) + 1)]
    assert results[0].logprobs is not None and results[1].logprobs is None


def test_prompt_unloaded_after_the_check_is_an_unknown_task(setup):
    _, _, engine, _ = setup
    engine.backend.table.remove("sent")  # as if an admin unload raced the request
    with pytest.raises(UnknownTaskError, match="unloaded while its request waited"):
        engine.classify([ClassifyRequest("sent", "good")])


def test_logprobs_are_the_models_and_top_k_is_ranked(setup):
    model, tok, engine, prompts = setup
    req = GenerateRequest("caps", {"country": "France"}, max_tokens=4, logprobs=3)
    res, plain = engine.generate([req, GenerateRequest("sent", "bad", max_tokens=3)])
    assert plain.logprobs is None and len(res.logprobs) == len(res.tokens)
    ids = ids_of(tok, CAPS["template"].format(country="France"))
    for t, got in zip(res.tokens, res.logprobs, strict=True):
        with torch.no_grad():
            lp = torch.log_softmax(reference_logits(model, prompts["caps"], ids)[-1].double(), -1)
        assert got.token == t and got.logprob == pytest.approx(float(lp[t]), abs=1e-4)
        assert [i for i, _ in got.top] == lp.topk(3).indices.tolist()
        assert got.top[0][0] == t  # greedy: the chosen token is the most likely
        ids.append(t)
    with pytest.raises(RequestError, match="logprobs must be"):
        engine.generate([GenerateRequest("caps", "France", logprobs=21)])


def test_score_with_eos_scores_the_continuation_and_the_end_of_the_answer(tokenizer):
    model = make_model("llama")
    engine = Engine(model, tokenizer)
    engine.add_base("base")
    plain, ended = engine.score([ScoreRequest("base", "France", " Paris", raw=True),
                                 ScoreRequest("base", "France", " Paris", raw=True, eos=True)])
    assert ended.tokens == [*plain.tokens, tokenizer.eos_token_id]
    assert ended.token_logprobs[:-1] == pytest.approx(plain.token_logprobs, abs=1e-5)
    assert ended.logprob == pytest.approx(plain.logprob + ended.token_logprobs[-1], abs=1e-5)
    with pytest.raises(RequestError, match="eos must be true or false"):
        engine.score([ScoreRequest("base", "France", " Paris", raw=True, eos="yes")])


def test_scores_are_read_in_chunks_of_positions_without_changing_them(setup, monkeypatch):
    """Only the asked-for log-probs leave the device, a chunk of positions at a time (the whole (N, V)
    log-softmax went to the host); chunks of 1 and 3 positions give the same scores and labels."""
    from softprompt.engine import prefix_backend

    _, _, engine, _ = setup
    reqs = [ScoreRequest("sent", "good film", " positive"), ScoreRequest("caps", {"country": "Italy"}, " Rome"),
            ScoreRequest("base", "the movie", " was very good", raw=True)]
    labels = [ClassifyRequest(t, x) for t in ("sent", "sent2") for x in TEXTS[:3]]
    whole = ([r.token_logprobs for r in engine.score(reqs)], [r.scores for r in engine.classify(labels)])
    for chunk in (1, 3):
        monkeypatch.setattr(prefix_backend, "SCORE_CHUNK", chunk)
        got = ([r.token_logprobs for r in engine.score(reqs)], [r.scores for r in engine.classify(labels)])
        for a, b in zip(got[0], whole[0], strict=True):
            assert a == pytest.approx(b, abs=1e-5)
        for a, b in zip(got[1], whole[1], strict=True):
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)


def test_a_task_of_one_multi_token_label_classifies(tokenizer):
    # its one row of per-token log-probs was taken for a row of single-token candidates: a 500 for every request
    from softprompt.data import TaskFormat

    engine = Engine(make_model("llama"), tokenizer)
    for name, verbalizer in (("one", {"yes": "very good"}), ("one-token", {"yes": "good"})):
        engine.add_base(name, TaskFormat("Review: {text}\nSentiment:", "label", verbalizer))
        (res,) = engine.classify([ClassifyRequest(name, "the movie")])
        (score,) = engine.score([ScoreRequest(name, "Review: the movie\nSentiment:", " " + verbalizer["yes"],
                                              raw=True)])
        assert res.label == "yes" and res.probs == {"yes": pytest.approx(1.0)}
        assert res.scores["yes"] == pytest.approx(score.logprob, abs=1e-4)


def test_a_task_name_is_a_non_empty_string_and_the_base_task_is_not_replaced_by_a_prompt(tmp_path, tokenizer):
    """add_prompt(123, ...) was served and broke task_names() and every unknown-task error with a TypeError; ""
    was served but no request can name it; add_prompt/add_kv/add_ensemble("base", ...) silently replaced the
    plain base-model task (load_from_store refused that)."""
    model = make_model("llama")
    engine = Engine(model, tokenizer)
    sent = stored(tmp_path, model, tokenizer, "sent", 3, SENT, 1)
    engine.add_prompt("sent", sent)
    engine.add_prompt("sent3", stored(tmp_path, model, tokenizer, "sent3", 5, SENT, 4))
    engine.add_base("base")
    kv = forward.compute_prompt_kv(model, torch.randn(2, 32))
    for bad in (123, "", None, ("a",)):
        for add in (lambda n: engine.add_prompt(n, sent), lambda n: engine.add_kv(n, kv),
                    lambda n: engine.add_ensemble(n, ["sent", "sent3"]), lambda n: engine.add_base(n)):
            with pytest.raises(RequestError, match=re.escape(f"a task name must be a non-empty string, got {bad!r}")):
                add(bad)
    assert engine.task_names() == ["base", "sent", "sent3"]
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'; loaded: base, sent, sent3"):
        engine.classify([ClassifyRequest("nope", "x")])
    for add in (lambda: engine.add_prompt("base", sent), lambda: engine.add_kv("base", kv),
                lambda: engine.add_ensemble("base", ["sent", "sent3"])):
        with pytest.raises(RequestError, match="task 'base' is the plain base model .*: a prompt cannot replace it"):
            add()
    with pytest.raises(RequestError, match="task 'sent' is already served with a prompt"):
        engine.add_base("sent")
    assert engine.describe("base")["kind"] == "base" and engine.describe("sent")["kind"] == "prompt"
    assert sorted(engine.backend.keys()) == ["sent", "sent3"]  # nothing half-loaded
    engine.add_base("base")  # the base model again under its own name, and a prompt over a prompt, are fine
    engine.add_prompt("sent", sent)
    # a folder where a loaded prompt goes, or no keys/values: a TypeError naming the call (a bare AttributeError)
    for call, bad in (("add_prompt", tmp_path / "sent"), ("add_prompt", str(tmp_path / "sent")), ("add_kv", None),
                      ("add_kv", kv.layers)):
        with pytest.raises(TypeError, match=rf"{call}\('new'\): expected a (StoredPrompt|PromptKV) "):
            getattr(engine, call)("new", bad)
    assert engine.task_names() == ["base", "sent", "sent3"] and sorted(engine.backend.keys()) == ["sent", "sent3"]


@pytest.mark.parametrize("raw", ["no", 0, 1, None, "false"])
def test_raw_must_be_a_bool_on_every_request_kind(tmp_path, tokenizer, raw):
    """raw="no" (truthy) silently dropped the template; raw=0/None went through as False."""
    model = make_model("llama")
    engine = Engine(model, tokenizer)
    engine.add_prompt("sent", stored(tmp_path, model, tokenizer, "sent", 3, SENT, 1))
    for kind, req in (("classify", ClassifyRequest("sent", "good", raw=raw)),
                      ("generate", GenerateRequest("sent", "good", raw=raw, max_tokens=2)),
                      ("score", ScoreRequest("sent", "good", " positive", raw=raw))):
        with pytest.raises(RequestError, match=re.escape(f"raw must be true or false, got {raw!r}")):
            engine.prepare(kind, req)
    with pytest.raises(RequestError) as err:  # with a dict input, the one problem is named (not "raw input ...")
        engine.prepare("classify", ClassifyRequest("sent", {"text": "good"}, raw=raw))
    assert "raw input must be a string" not in str(err.value)
    assert engine.prepare("generate", GenerateRequest("sent", "good", raw=True)).source == "good"
