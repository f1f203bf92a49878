"""The HTTP server on a tiny model: OpenAI client, concurrency, errors, admin, schema fuzz."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import socket
import time

import httpx
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from softprompt.engine import ClassifyRequest, Engine, GenerateRequest  # noqa: E402
from softprompt.methods import build_method  # noqa: E402
from softprompt.server import Scheduler, ServerState, create_app  # noqa: E402
from softprompt.store import PromptStore  # noqa: E402
from tests.conftest import gate_runs, make_model, serve  # noqa: E402

SENT = {"template": "Review: {text}\nSentiment:", "target_field": "label",
        "verbalizer": {"positive": "positive", "negative": "negative"}}
CAPS = {"template": "Country : {country} Capital :", "target_field": "capital", "verbalizer": None}
TOKEN = "s3cret"
WORDS = ["good movie", "bad plot", "the film was great", "awful", "a very good film", "not bad"]


def make_store(root, model, tok) -> PromptStore:
    store = PromptStore(root, create=True)
    for i in range(8):  # 8 tasks: classification and generation, prompts of 2..9 tokens
        method = build_method("prompt_tuning", {"num_virtual_tokens": 2 + i, "init": "random", "init_scale": 1.0,
                                                "seed": i}, model, tok)
        store.save(f"t{i}", method, model, task=SENT if i % 2 == 0 else CAPS)
    return store


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    model = make_model("llama")
    store = make_store(tmp_path_factory.mktemp("store"), model, tokenizer)
    engine = Engine.from_store(store, model, tokenizer, max_batch_rows=16)
    engine.add_base("base")
    state = ServerState(engine, Scheduler(engine, max_batch_requests=16, max_wait_ms=20), store=store,
                        admin_token=TOKEN, max_tokens=64)
    return state, create_app(state)


@pytest.fixture(scope="module")
def live(served):
    """The app under uvicorn on a free 127.0.0.1 port, in a thread."""
    url, stop = serve(served[1])
    yield url
    stop()


def direct(state, kind, reqs):
    """The engine called directly, bypassing HTTP and the scheduler."""
    return getattr(state.engine, kind)(reqs)


def test_openai_client_completions_chat_and_streaming(served, live):
    openai = pytest.importorskip("openai")
    state, _ = served
    client = openai.OpenAI(base_url=f"{live}/v1", api_key="unused")
    assert {m.id for m in client.models.list().data} == {f"t{i}" for i in range(8)} | {"base"}
    comp = client.completions.create(model="t1", prompt="France", max_tokens=5, temperature=0)
    ref = direct(state, "generate", [GenerateRequest("t1", "France", max_tokens=5)])[0]
    assert comp.choices[0].text == ref.text and comp.choices[0].finish_reason == ref.finish_reason
    assert comp.usage.completion_tokens == len(ref.tokens)
    chat = client.chat.completions.create(model="t3", messages=[{"role": "system", "content": "x"},
                                                                {"role": "user", "content": "Spain"}],
                                          max_tokens=4, temperature=0)
    ref = direct(state, "generate", [GenerateRequest("t3", "Spain", max_tokens=4)])[0]
    assert chat.choices[0].message.content == ref.text and chat.choices[0].message.role == "assistant"
    stream = client.completions.create(model="t1", prompt="Italy", max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    ref = direct(state, "generate", [GenerateRequest("t1", "Italy", max_tokens=6)])[0]
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason and len(chunks) >= 1 + bool(ref.text)
    cstream = client.chat.completions.create(model="t5", messages=[{"role": "user", "content": "Italy"}],
                                             max_tokens=6, temperature=0, stream=True)
    parts = list(cstream)
    ref = direct(state, "generate", [GenerateRequest("t5", "Italy", max_tokens=6)])[0]
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == ref.text
    # stream_options.include_usage (the OpenAI SDK's way to count streamed tokens): a last chunk with no
    # choices and the usage, every other chunk "usage": null (it was ignored: no usage at all)
    for create, kw in ((client.completions.create, {"prompt": "Italy"}),
                       (client.chat.completions.create, {"messages": [{"role": "user", "content": "Italy"}]})):
        parts = list(create(model="t5", max_tokens=6, temperature=0, stream=True,
                            stream_options={"include_usage": True}, **kw))
        ref = direct(state, "generate", [GenerateRequest("t5", "Italy", max_tokens=6)])[0]
        assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == len(ref.tokens)
        assert parts[-1].usage.total_tokens == parts[-1].usage.prompt_tokens + len(ref.tokens)
        assert all(p.usage is None for p in parts[:-1]) and len(parts) >= 3


def test_streaming_never_sends_text_after_a_stop_string(served, live):
    state, _ = served
    free = direct(state, "generate", [GenerateRequest("base", "the movie was", raw=True, max_tokens=10)])[0]
    words = free.text.split()
    if len(words) < 2:
        pytest.skip("greedy output too short on this random model")
    body = {"model": "base", "prompt": "the movie was", "raw": True, "max_tokens": 10, "temperature": 0,
            "stream": True, "stop": [words[1]]}
    with httpx.stream("POST", f"{live}/v1/completions", json=body, timeout=60) as r:
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    text = "".join(json.loads(ln)["choices"][0]["text"] for ln in lines[:-1])
    assert text == free.text[:free.text.index(words[1])]


def test_200_concurrent_requests_over_8_tasks_equal_the_engine(served, live, monkeypatch):
    state, _ = served
    jobs = []
    for i in range(200):
        task, text = f"t{i % 8}", WORDS[i % len(WORDS)]
        if i % 8 % 2 == 0:
            jobs.append(("classify", {"model": task, "input": text}, ClassifyRequest(task, text)))
        else:
            seed = i if i % 3 == 0 else None
            temperature = 0.8 if seed is not None else 0.0
            jobs.append(("completions", {"model": task, "prompt": text, "max_tokens": 4, "temperature": temperature,
                                         "seed": seed},
                         GenerateRequest(task, text, max_tokens=4, temperature=temperature, seed=seed)))

    # The engine is held until the server has taken in all 200 requests (each one is prepared before it is
    # queued, and none can finish while the engine is held): 200 really are in flight at once.
    engine = state.engine
    gate, _ = gate_runs(monkeypatch, engine)
    prepared, real_prepare = [], engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: prepared.append(1) or real_prepare(*a, **k))

    async def call_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=live, timeout=120, limits=limits) as client:
            calls = [asyncio.ensure_future(client.post(f"/v1/{kind}", json=body)) for kind, body, _ in jobs]
            deadline = time.monotonic() + 60
            while len(prepared) < 200 and time.monotonic() < deadline and not any(c.done() for c in calls):
                await asyncio.sleep(0.01)
            in_flight = len(prepared)
            gate.set()
            responses = await asyncio.gather(*calls)
        assert in_flight == 200
        return responses

    # an earlier test's last batch may still be counting (a stream ends at its stop string before the batch
    # that produced it is booked): take the counts once the scheduler has been idle for a moment
    before, deadline = dataclasses.replace(state.scheduler.stats), time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = dataclasses.replace(state.scheduler.stats)
        if now == before:
            break
        before = now
    try:
        responses = asyncio.run(asyncio.wait_for(call_all(), 180))
    finally:
        gate.set()
    after = state.scheduler.stats
    assert [r.status_code for r in responses] == [200] * 200
    for (kind, _, req), resp in zip(jobs, responses, strict=True):
        if kind == "classify":
            got, ref = resp.json()["data"][0], direct(state, "classify", [req])[0]
            assert got["label"] == ref.label and got["probs"] == pytest.approx(ref.probs, abs=1e-5)
        else:
            assert resp.json()["choices"][0]["text"] == direct(state, "generate", [req])[0].text
    # this run's own counts: 200 rows in fewer batches, so some batch of this run held several requests
    rows, batches = after.rows - before.rows, after.batches - before.batches
    assert rows == 200 and batches < rows
    assert batches <= 200 // 8  # held behind the engine, they queue up and go in (nearly) full batches of 16


def test_error_statuses(served):
    state, app = served
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404 and "unknown task 'nope'" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "t1", "prompt": "x", "temperature": 5})
        assert r.status_code == 422 and "temperature" in r.json()["error"]["message"]
        assert client.post("/v1/completions", content=b"{not json").status_code == 422
        r = client.post("/v1/completions", json={"model": "t1", "prompt": "x", "max_tokens": 1000})
        assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "t1", "prompt": " ".join(["good"] * 400)})
        assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]
        r = client.post("/v1/classify", json={"model": "t1", "input": "x"})
        assert r.status_code == 422 and "not a classification task" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "t1", "prompt": "x", "n": 2})
        assert r.status_code == 422
        assert client.get("/health").json()["status"] == "ok"  # still serving
        ok = client.post("/v1/classify", json={"model": "t0", "input": ["good", "bad"]}).json()
        assert [d["index"] for d in ok["data"]] == [0, 1] and set(ok["data"][0]["probs"]) == {"positive", "negative"}
        metrics = client.get("/metrics").text
        assert 'softprompt_requests_total{endpoint="/v1/completions",code="404"}' in metrics
        assert "softprompt_request_seconds_bucket" in metrics and "softprompt_tasks_loaded 9" in metrics


def test_max_tokens_defaults_follow_the_server_limit_and_a_chat_reply_gets_the_rest_of_the_context(tokenizer):
    """Without max_tokens, a completion under --max-tokens 8 was refused ("max_tokens 16 is over this server's
    limit of 8", a field the client never sent) and every chat reply was cut at 16 tokens."""
    engine = Engine(make_model("llama"), tokenizer)  # 256 positions
    engine.add_base("base")
    with TestClient(create_app(ServerState(engine, Scheduler(engine), max_tokens=8))) as client:
        r = client.post("/v1/completions", json={"model": "base", "raw": True, "temperature": 0, "prompt": "the"})
        ref = engine.generate([GenerateRequest("base", "the", raw=True, max_tokens=8)])[0]
        assert ref.finish_reason == "length" and len(ref.tokens) == 8  # a shorter default would show
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == len(ref.tokens), r.text
    limit = 40
    with TestClient(create_app(ServerState(engine, Scheduler(engine), max_tokens=limit))) as client:
        def completion(body):
            r = client.post("/v1/completions", json={"model": "base", "raw": True, "temperature": 0, **body})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]

        ref = engine.generate([GenerateRequest("base", "the movie", raw=True, max_tokens=16)])[0]
        assert ref.finish_reason == "length" and len(ref.tokens) == 16  # another default would show
        assert completion({"prompt": "the movie"}) == (ref.text, len(ref.tokens))  # OpenAI's 16
        r = client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": limit + 1})
        assert r.status_code == 400 and f"max_tokens {limit + 1} is over this server's limit of {limit}" in r.text

        def chat(words: int) -> tuple[dict, str]:
            content = " ".join(["good"] * words)
            r = client.post("/v1/chat/completions", json={"model": "base", "temperature": 0, "messages": [
                {"role": "user", "content": content}]})
            assert r.status_code == 200, r.text
            return r.json(), f"user: {content}\nassistant:"

        for words, room in ((3, limit), (230, None)):  # room for the limit; then only the context's rest
            got, text = chat(words)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            want = room or engine.context - n
            assert want < limit or room
            ref = engine.generate([GenerateRequest("base", text, raw=True, max_tokens=want)])[0]
            # the reply runs to its limit, past 16 tokens: a reply cut at 16 (the old bug) would show
            assert ref.finish_reason == "length" and len(ref.tokens) == want > 16
            assert got["choices"][0]["message"]["content"] == ref.text
            assert got["usage"]["completion_tokens"] == len(ref.tokens)
            assert got["choices"][0]["finish_reason"] == ref.finish_reason


def test_a_request_larger_than_the_whole_queue_is_400_not_a_429_to_retry(tokenizer):
    engine = Engine(make_model("llama"), tokenizer)
    engine.add_base("base")
    state = ServerState(engine, Scheduler(engine, max_queue=2))
    with TestClient(create_app(state)) as client:
        r = client.post("/v1/completions", json={"model": "base", "prompt": ["the"] * 3, "max_tokens": 1})
        assert r.status_code == 400 and "retry-after" not in r.headers
        assert "3 texts, more than the whole queue holds (--max-queue 2)" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "base", "prompt": ["the"] * 2, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2  # a full queue's worth is admitted
    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        Scheduler(engine, max_queue=0)


@pytest.mark.parametrize("policy", ["continuous", "batch"])
def test_requests_over_a_full_positive_queue_are_429_and_the_admitted_ones_succeed(tokenizer, monkeypatch, policy):
    engine = Engine(make_model("llama"), tokenizer)
    engine.add_base("base")
    # what each admitted request must answer: the engine's own greedy generation of it
    ref = engine.generate([GenerateRequest("base", "bad plot", raw=True, max_tokens=2)])[0]
    assert ref.text.strip() and len(ref.tokens) == 2  # a reply with words: a wrong one shows
    gate, ran = gate_runs(monkeypatch, engine)  # the worker holds the first request; the rest wait in the queue
    held = gate.entered
    sched = Scheduler(engine, max_batch_requests=16, max_wait_ms=1, max_queue=4, policy=policy)
    assert sched.policy == policy
    body = {"model": "base", "prompt": "bad plot", "raw": True, "max_tokens": 2, "temperature": 0}

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    with TestClient(create_app(ServerState(engine, sched))) as client, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        try:
            admitted = [pool.submit(client.post, "/v1/completions", json=body)]
            assert held.wait(30) and sched.depth() == 0  # the worker took it and is held in the engine
            for n in range(1, 5):
                admitted.append(pool.submit(client.post, "/v1/completions", json=body))
                wait_for(lambda n=n: sched.depth() == n)
            over = [pool.submit(client.post, "/v1/completions", json=body) for _ in range(3)]  # queue at 4
            refused = [f.result(30) for f in over]  # answered while the engine is still held
        finally:
            gate.set()
        assert [r.status_code for r in refused] == [429] * 3
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
                   and "queue full (4 of 4 requests waiting" in r.json()["error"]["message"] for r in refused)
        done = [f.result(60) for f in admitted]
    assert [r.status_code for r in done] == [200] * 5
    assert len({r.json()["choices"][0]["text"] for r in done}) == 1  # greedy: alone or batched, the same
    assert [(r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]) for r in done] == \
        [(ref.text, len(ref.tokens))] * 5
    assert len(ran) == 5  # the refused ones never reached the engine


def test_admin_needs_the_bearer_token_and_loads_unloads_reloads(served):
    state, app = served
    with TestClient(app) as client:
        assert client.post("/admin/tasks/t2/unload").status_code == 401
        assert client.post("/admin/tasks/t2/unload", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post("/admin/tasks/t2/unload", headers=auth).json() == {"unloaded": "t2"}
        assert client.post("/v1/classify", json={"model": "t2", "input": "good"}).status_code == 404
        # a new prompt saved into the store while serving
        method = build_method("prompt_tuning", {"num_virtual_tokens": 3, "init": "random", "seed": 99},
                              state.engine.model, state.engine.tok)
        state.store.save("fresh", method, state.engine.model, task=SENT)
        assert client.post("/admin/tasks/fresh/load", headers=auth).status_code == 200
        assert client.post("/admin/tasks/t2/load", headers=auth).status_code == 200
        assert client.post("/v1/classify", json={"model": "fresh", "input": "good"}).status_code == 200
        assert client.post("/admin/tasks/missing/load", headers=auth).status_code == 400
        # a reload serves the store entry as it is now: t2 is replaced in the store by another prompt (7 virtual
        # tokens, not 4; another seed, template and verbalizer); until the reload, the old one is still served
        inputs = ["good", "bad plot", "the film was great", "awful"]

        def served_t2() -> list[dict]:
            r = client.post("/v1/classify", json={"model": "t2", "input": inputs})
            assert r.status_code == 200, r.text
            return r.json()["data"]

        old = state.engine.classify([ClassifyRequest("t2", x) for x in inputs])
        method = build_method("prompt_tuning", {"num_virtual_tokens": 7, "init": "random", "init_scale": 1.0,
                                                "seed": 123}, state.engine.model, state.engine.tok)
        task = {"template": "Classify sentiment : {text} .", "target_field": "label",
                "verbalizer": {"positive": "good", "negative": "bad"}}
        state.store.save("t2", method, state.engine.model, task=task, overwrite=True)
        assert [d["probs"] for d in served_t2()] == [pytest.approx(o.probs, abs=1e-5) for o in old]
        r = client.post("/admin/tasks/t2/reload", headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["task"]["prompt_tokens"] == [7] and r.json()["task"]["template"] == task["template"]
        fresh = Engine.from_store(state.store, state.engine.model, state.engine.tok, names=["t2"])
        new = fresh.classify([ClassifyRequest("t2", x) for x in inputs])
        got = served_t2()
        assert [d["label"] for d in got] == [n.label for n in new]
        assert [d["probs"] for d in got] == [pytest.approx(n.probs, abs=1e-5) for n in new]
        assert any(abs(n.probs["positive"] - o.probs["positive"]) > 1e-3 for n, o in zip(new, old, strict=True))
        state.engine.unload("fresh")
    engine = Engine(make_model("llama"), state.engine.tok)
    engine.add_base("base")
    with TestClient(create_app(ServerState(engine, Scheduler(engine)))) as client:
        assert client.post("/admin/tasks/base/unload", headers={"Authorization": "Bearer x"}).status_code == 403


def test_scheduler_isolates_a_bad_request_in_a_batch(served, monkeypatch):
    state, _ = served
    engine = state.engine
    sched = state.scheduler
    sched.start()  # a TestClient leaving its block stops the scheduler with the app
    # a request the engine refuses at preparation fails at once, before any batch
    futures = [sched.submit("classify", ClassifyRequest("t0", "good")),
               sched.submit("classify", ClassifyRequest("t1", "bad")),  # a generation task: rejected
               sched.submit("classify", ClassifyRequest("t2", "great"))]
    refs = direct(state, "classify", [ClassifyRequest("t0", "good"), ClassifyRequest("t2", "great")])
    got = futures[0].result(60)
    assert got.label == refs[0].label and got.probs == pytest.approx(refs[0].probs, abs=1e-5)
    with pytest.raises(Exception, match="not a classification task"):
        futures[1].result(60)
    got = futures[2].result(60)
    assert got.label == refs[1].label and got.probs == pytest.approx(refs[1].probs, abs=1e-5)

    # a request that fails inside the batch's engine call: the batch is halved until it fails alone, and the
    # others are served (their results as a direct engine call's)
    texts = ["good", "bad", "boom", "great", "awful", "the film", "a plot", "not bad"]
    reqs = [ClassifyRequest(f"t{2 * (i % 4)}", t) for i, t in enumerate(texts)]
    refs = dict(zip(texts, direct(state, "classify", reqs), strict=True))
    real, calls = engine.run, []

    def run(kind, items, on_token=None, cancelled=None, **kw):
        calls.append([p.request.input for p in items])
        if any(p.request.input == "boom" for p in items):
            raise RuntimeError("a row that breaks the forward")
        return real(kind, items, on_token, cancelled, **kw)

    monkeypatch.setattr(engine, "run", run)
    # the batch closes when full (all 8), not when the wait ends: the 8 requests go in one engine call
    isolating = Scheduler(engine, max_batch_requests=len(texts), max_wait_ms=60_000)
    isolating.start()
    try:
        futures = [isolating.submit("classify", r) for r in reqs]
        for t, f in zip(texts, futures, strict=True):
            if t == "boom":
                with pytest.raises(RuntimeError, match="breaks the forward"):
                    f.result(60)
            else:
                got = f.result(60)
                assert got.label == refs[t].label and got.probs == pytest.approx(refs[t].probs, abs=1e-5), t
    finally:
        isolating.stop()
    stats = isolating.stats
    assert stats.failed == 1 and stats.batches == 1 and stats.rows == len(texts)
    assert calls[0] == texts  # all in one call first
    served_in = [c for c in calls if "boom" not in c]
    assert ["boom"] in calls and sorted(t for c in served_in for t in c) == sorted(t for t in texts if t != "boom")
    assert max(len(c) for c in served_in) >= 3  # the others were served in batches, not one by one


def test_schema_fuzz_finds_no_5xx(served):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _, app = served
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(-3, 3, allow_nan=False),
                        st.text(max_size=12), st.sampled_from(["t0", "t1", "base", "nope", ""]))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=6)
    keys = st.sampled_from(["model", "prompt", "messages", "input", "max_tokens", "temperature", "top_p", "top_k",
                            "seed", "stop", "stream", "n", "raw", "continuation", "max_completion_tokens",
                            "logprobs", "top_logprobs"])
    bodies = st.dictionaries(keys, values, max_size=7)
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/score"])
    client = TestClient(app)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(path=paths, body=bodies)
    def fuzz(path, body):
        if body.get("max_tokens") is not None and isinstance(body["max_tokens"], int):
            body["max_tokens"] = min(body["max_tokens"], 3)  # keep generation short
        r = client.post(path, json=body)
        assert r.status_code < 500, (path, body, r.text)

    with client:
        fuzz()
    assert hypothesis.__version__


def test_serve_command_in_a_subprocess(tmp_path, tokenizer, tiny_model_dir):
    import os
    import subprocess
    import sys

    from softprompt.model import load_base_model

    model, tok = load_base_model(tiny_model_dir, device="cpu")
    store = make_store(tmp_path / "store", model, tok)
    # what the served tasks answer: the same model and store, called directly
    refs = Engine.from_store(store, model, tok, names=["t0", "t2"]).classify([ClassifyRequest("t0", "good"),
                                                                              ClassifyRequest("t2", "bad")])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "SOFTPROMPT_ADMIN_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", "--model", str(tiny_model_dir), "--store",
                             str(tmp_path / "store"), "--tasks", "t0,t1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]} == {"t0", "t1", "base"}
        r = httpx.post(f"{url}/v1/classify", json={"model": "t0", "input": "good"})
        assert r.status_code == 200 and r.json()["data"][0]["label"] == refs[0].label
        assert r.json()["data"][0]["probs"] == pytest.approx(refs[0].probs, abs=1e-5)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.post(f"{url}/admin/tasks/t2/load", headers=auth, timeout=30).status_code == 200
        r = httpx.post(f"{url}/v1/classify", json={"model": "t2", "input": "bad"})
        assert r.status_code == 200 and r.json()["data"][0]["label"] == refs[1].label
        assert r.json()["data"][0]["probs"] == pytest.approx(refs[1].probs, abs=1e-5)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "serving 3 tasks" in out, out[-2000:]


def test_health_is_503_once_the_scheduler_thread_is_gone(tokenizer):
    # it answered "ok" while every request failed (a worker thread ended by an error no handler catches)
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from softprompt.engine import Engine
    from softprompt.server import Scheduler, ServerState, create_app
    from tests.conftest import make_model

    engine = Engine(make_model("llama"), tokenizer)
    engine.add_base("base")
    state = ServerState(engine, Scheduler(engine), max_tokens=8)
    with TestClient(create_app(state)) as client:
        assert client.get("/health").status_code == 200
        state.scheduler.stop()  # as if the thread had died
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "scheduler stopped"
