"""A failed (re)load changes nothing that is served; a reload swaps in between batches (issue 9, item 9)."""

from __future__ import annotations

import threading

import pytest
import torch

from softprompt import forward
from softprompt.engine import ClassifyRequest, Engine, GenerateRequest
from softprompt.engine import engine as engine_module
from softprompt.engine.running import RunningBatch
from softprompt.forward import causal
from softprompt.methods import build_method
from softprompt.store import PromptStore, StoreError
from tests.conftest import make_model

SENT = {"template": "Review: {text}\nSentiment:", "target_field": "label",
        "verbalizer": {"positive": "positive", "negative": "negative"}}


def save(store, model, tok, name: str, seed: int, n: int = 4, task=SENT):
    method = build_method("prompt_tuning", {"num_virtual_tokens": n, "init": "random", "init_scale": 1.0,
                                            "seed": seed}, model, tok)
    store.save(name, method, model, task=task, overwrite=name in store)


@pytest.fixture
def served(tmp_path, tokenizer):
    model = make_model("llama")
    store = PromptStore(tmp_path / "store", create=True)
    for i, name in enumerate(["a", "b"]):
        save(store, model, tokenizer, name, seed=i)
    store.add_ensemble("ab", ["a", "b"])
    engine = Engine.from_store(store, model, tokenizer)
    return engine, store, model, tokenizer


def snapshot(engine: Engine) -> dict:
    reqs = [ClassifyRequest(t, "good movie") for t in ("a", "b", "ab")]
    return {"scores": [r.scores for r in engine.classify(reqs)],
            "kv": {k: [t.clone() for pair in engine.backend.table._kv[k].layers for t in pair]
                   for k in engine.backend.table.keys()},
            "tasks": dict(engine.tasks), "formats": dict(engine._formats)}


def same(a: dict, b: dict) -> bool:
    return (a["scores"] == b["scores"] and a["tasks"] == b["tasks"] and a["formats"] == b["formats"]
            and a["kv"].keys() == b["kv"].keys()
            and all(torch.equal(x, y) for k in a["kv"] for x, y in zip(a["kv"][k], b["kv"][k], strict=True)))


@pytest.mark.parametrize("fail_at", ["format", "keys/values", "table"])
def test_a_failed_reload_leaves_the_served_task_unchanged(served, monkeypatch, fail_at):
    engine, store, model, tok = served
    before = snapshot(engine)
    save(store, model, tok, "a", seed=7, n=6)  # the new version on disk
    if fail_at == "format":
        monkeypatch.setattr(engine_module, "task_format", lambda meta: (_ for _ in ()).throw(ValueError("bad")))
    elif fail_at == "keys/values":
        real = causal.compute_prompt_kv
        monkeypatch.setattr(causal, "compute_prompt_kv",
                            lambda m, p: forward.PromptKV([(k * float("nan"), v) for k, v in real(m, p).layers],
                                                         p.embeds.shape[0]))
    else:
        monkeypatch.setattr(engine.backend.table, "check", lambda key, kv: (_ for _ in ()).throw(
            forward.InjectionError("does not fit")))
    with pytest.raises((ValueError, StoreError)):
        engine.load_from_store(store, "a")
    with pytest.raises((ValueError, StoreError)):
        engine.load_from_store(store, "ab")  # an ensemble reloads its members: none may change either
    assert same(snapshot(engine), before)
    monkeypatch.undo()
    engine.load_from_store(store, "a")  # the same reload, now working, does change it
    assert engine.describe("a")["prompt_tokens"] == [6]


def test_add_kv_refuses_non_finite_keys_values(served):
    engine, *_ = served
    before = snapshot(engine)
    kv = engine.backend.table._kv["a"]
    bad = forward.PromptKV([(k.clone().fill_(float("inf")), v) for k, v in kv.layers], kv.length)
    with pytest.raises(StoreError, match="not finite"):
        engine.add_kv("inf", bad)
    assert "inf" not in engine.tasks and same(snapshot(engine), before)


def test_a_reload_waits_for_the_running_batch(served, monkeypatch):
    """The swap lands between engine calls: a generation that started with the old prompt finishes with it
    (in the server's running batch, rows keep the prompt they joined with: tests/test_running.py)."""
    engine, store, model, tok = served
    old = engine.generate([GenerateRequest("a", "good", max_tokens=6)])[0]
    save(store, model, tok, "a", seed=9, n=5)
    started, swapped = threading.Event(), threading.Event()
    real = RunningBatch.step

    def step(self):
        if not started.is_set():
            started.set()
            assert not swapped.wait(0.5)  # the reload cannot finish while this batch runs
        return real(self)

    monkeypatch.setattr(RunningBatch, "step", step)
    result = {}
    runner = threading.Thread(target=lambda: result.update(r=engine.generate([GenerateRequest("a", "good",
                                                                                              max_tokens=6)])[0]))
    runner.start()
    assert started.wait(30)
    loader = threading.Thread(target=lambda: (engine.load_from_store(store, "a"), swapped.set()))
    loader.start()
    runner.join(60)
    loader.join(60)
    assert swapped.is_set() and result["r"].tokens == old.tokens
    assert engine.describe("a")["prompt_tokens"] == [5]


def test_a_request_prepared_before_a_reload_runs_against_the_new_prompt(served):
    engine, store, model, tok = served
    item = engine.prepare("classify", ClassifyRequest("a", "good"))
    save(store, model, tok, "a", seed=11, n=7)
    engine.load_from_store(store, "a")
    fresh = engine.classify([ClassifyRequest("a", "good")])[0]
    assert engine.run("classify", [item])[0].scores == fresh.scores


def test_a_reload_between_preparing_and_joining_the_running_batch_joins_with_the_new_prompt(served,
                                                                                           monkeypatch):
    """RunningBatch.admit re-prepared a stale request, then fetched its prompt under another lock: a reload in
    between made the row run the new prompt with ids prepared for the old one (its template, its length)."""
    engine, store, model, tok = served
    other = {**SENT, "template": "Film review : {text} Sentiment :"}
    real, calls = engine.backend.prompt, []

    def reload_first(key):
        if not calls:  # a reload lands right after the refresh, before the prompt is fetched
            save(store, model, tok, "a", seed=12, n=6, task=other)
            engine.load_from_store(store, "a")
        calls.append(key)
        return real(key)

    item = engine.prepare("generate", GenerateRequest("a", "good movie", max_tokens=3))
    monkeypatch.setattr(engine.backend, "prompt", reload_first)
    batch = RunningBatch(engine)
    got = {}
    batch.admit(item, done=lambda res: got.__setitem__("res", res))
    (row,) = batch.rows
    assert row.item.versions == engine.versions(["a"]) and row.prompt is real("a")
    monkeypatch.setattr(engine.backend, "prompt", real)
    while len(batch):
        batch.step()
    fresh = engine.generate([GenerateRequest("a", "good movie", max_tokens=3)])[0]
    assert got["res"].tokens == fresh.tokens and got["res"].source == fresh.source


def test_a_reloaded_member_brings_its_new_format_to_the_ensembles_that_serve_it(served):
    """Reloading prompt 'a' replaced its keys/values but the ensemble 'ab' kept a's old template: the new prompt
    ran behind the old template, unlike a freshly started engine. Loading 'ab' again rebuilt a and b's keys
    but left tasks a and b with their old formats."""
    engine, store, model, tok = served
    other = {**SENT, "template": "Film review : {text} Sentiment :"}
    save(store, model, tok, "a", seed=7, task=other)
    engine.load_from_store(store, "a")
    fresh = Engine.from_store(store, model, tok)
    reqs = [ClassifyRequest(t, x) for t in ("a", "ab") for x in ("good movie", "a bad plot")]
    assert [r.scores for r in engine.classify(reqs)] == [r.scores for r in fresh.classify(reqs)]
    assert engine.task("ab").formats[0].template == other["template"] == engine.describe("a")["template"]
    # the reverse: the ensemble reloaded after b changed in the store gives task b its new format as well
    save(store, model, tok, "b", seed=8, task=other)
    engine.load_from_store(store, "ab")
    assert engine.task("b").formats[0].template == other["template"]
    fresh = Engine.from_store(store, model, tok)
    reqs = [ClassifyRequest(t, "good movie") for t in ("a", "b", "ab")]
    assert [r.scores for r in engine.classify(reqs)] == [r.scores for r in fresh.classify(reqs)]
    # a member whose labels would no longer match its ensemble's other members is refused: nothing changes
    before = snapshot(engine)
    store.remove("ab")  # the store refuses the change while its ensemble lists a; the engine still serves ab
    save(store, model, tok, "a", seed=9, task={**SENT, "verbalizer": {"yes": "positive", "no": "negative"}})
    with pytest.raises(Exception, match="ensemble 'ab': ensemble members must be classification prompts with the "
                                        "same labels"):
        engine.load_from_store(store, "a")
    assert same(before, snapshot(engine))


def test_a_fitted_max_tokens_is_fitted_again_after_a_reload(served):
    # a chat request without max_tokens gets the room the context leaves after the prompt as its ceiling; the
    # copy fitted to the old, shorter prompt was re-prepared as it was, and the request failed as too long
    engine, store, model, tok = served
    text = " ".join(["good"] * 200)
    item = engine.prepare("generate", GenerateRequest("a", text, raw=True, max_tokens=500, fit_max_tokens=True))
    assert item.request.max_tokens == engine.context - 4 - 200  # what P = 4 leaves
    save(store, model, tok, "a", seed=11, n=40)
    engine.load_from_store(store, "a")
    (res,) = engine.run("generate", [item])
    fresh = engine.prepare("generate", GenerateRequest("a", text, raw=True, max_tokens=500, fit_max_tokens=True))
    assert fresh.request.max_tokens == engine.context - 40 - 200 and len(res.tokens) <= fresh.request.max_tokens
    assert res.tokens == engine.run("generate", [fresh])[0].tokens


class _WatchedLock:
    """The engine's batch lock, held by the test's thread; ``waiting`` is set once another thread asks for it."""

    def __init__(self, lock):
        self.lock, self.owner, self.waiting = lock, threading.get_ident(), threading.Event()

    def __enter__(self):
        if threading.get_ident() != self.owner:
            self.waiting.set()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def unload_while_waiting(engine: Engine, change, unload: str) -> dict:
    """Run ``change()`` in a thread while the batch lock is held (a batch runs); once it waits for the lock, unload
    ``unload`` (an admin call that got the lock first), then let the change go on. Returns its result or error."""
    watched = _WatchedLock(engine._batch_lock)
    engine._batch_lock = watched
    out = {}

    def run():
        try:
            out["result"] = change()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out["error"] = e

    with watched:
        worker = threading.Thread(target=run)
        worker.start()
        assert watched.waiting.wait(60)
        engine.unload(unload)
    worker.join(60)
    assert not worker.is_alive()
    return out


def test_an_ensemble_unloaded_while_a_member_reloads_stays_unloaded(served):
    """The reload listed the tasks to rebuild before taking the batch lock: an unload of the ensemble that ran
    first was undone, the ensemble came back and failed every request."""
    engine, store, model, tok = served
    save(store, model, tok, "a", seed=7, n=5)
    out = unload_while_waiting(engine, lambda: engine.load_from_store(store, "a"), "ab")
    assert "error" not in out and engine.task_names() == ["a", "b"]
    assert engine.describe("a")["prompt_tokens"] == [5]
    assert [r.label for r in engine.classify([ClassifyRequest(t, "good") for t in ("a", "b")])]


def test_an_ensemble_whose_member_is_unloaded_before_it_is_added_is_refused(served):
    """add_ensemble checked its members were loaded before taking the batch lock: a member unloaded in between
    left an ensemble over a prompt no longer served."""
    engine, *_ = served
    engine.unload("ab")
    out = unload_while_waiting(engine, lambda: engine.add_ensemble("ab2", ["a", "b"]), "b")
    assert "members not loaded: ['b']" in str(out.get("error")) and engine.task_names() == ["a"]
    assert sorted(engine.backend.keys()) == ["a"]
