"""Hostile requests against the server: each fails alone, with a clear 4xx, and harms nothing else (issue 9)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from softprompt.engine import ClassifyRequest, Engine, GenerateRequest  # noqa: E402
from softprompt.server import Scheduler, ServerState, create_app  # noqa: E402
from softprompt.server.scheduler import QueueFullError  # noqa: E402
from tests.conftest import gate_runs, make_model, serve  # noqa: E402
from tests.test_server import TOKEN, WORDS, make_store  # noqa: E402


def post(url: str, body: dict) -> httpx.Response:
    """POST ``body`` as ASCII JSON: lone surrogates travel as ``\\udXXX`` escapes, as a hostile client sends them."""
    return httpx.post(url, content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                      timeout=60)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    model = make_model("llama")
    store = make_store(tmp_path_factory.mktemp("store"), model, tokenizer)
    engine = Engine.from_store(store, model, tokenizer, max_batch_rows=16)
    engine.add_base("base")
    state = ServerState(engine, Scheduler(engine, max_batch_requests=16, max_wait_ms=50), store=store,
                        admin_token=TOKEN, max_tokens=64, max_body_bytes=64 * 1024, max_input_chars=2000)
    app = create_app(state)
    url, stop = serve(app)
    yield state, app, url
    stop()


HOSTILE = [
    ("/v1/completions", {"model": "t1", "prompt": "France", "temperature": 1, "seed": 18446744073709551616}),
    ("/v1/completions", {"model": "t1", "prompt": "\ud800", "max_tokens": 3}),
    ("/v1/chat/completions", {"model": "t1", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    ("/v1/chat/completions", {"model": "t1", "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                        "image_url": "x"}]}]}),
    ("/v1/classify", {"model": "t0", "input": {"text": "\udfff"}}),
    ("/v1/score", {"model": "t1", "input": "France", "continuation": "\ud800x"}),
    ("/v1/completions", {"model": "t1", "prompt": "France", "seed": -(2**63) - 1, "temperature": 1}),
    ("/v1/chat/completions", {"model": "t1", "messages": [{"role": "user", "content": "France"}], "top_logprobs": 2}),
    ("/v1/classify", {"model": "t0", "input": {"\ud800": "x"}}),  # a surrogate in a key (no field 'text')
    ("/v1/classify", {"model": "t0", "input": "", "raw": True}),  # no tokens, no BOS: nothing predicts the label
    ("/v1/score", {"model": "t1", "input": " ", "continuation": "x", "raw": True}),
    ("/v1/completions", {"model": "t1", "prompt": "France", "max_tokens": True}),  # true is no token count
    ("/v1/completions", {"model": "t1", "prompt": "France", "max_tokens": "3"}),
    ("/v1/completions", {"model": "t1", "prompt": "France", "temperature": True}),
    ("/v1/classify", {"model": "t0", "input": "good", "raw": "yes"}),
    ("/v1/completions", {"model": "t1", "prompt": "France", "logit_bias": {"5": -100}}),  # would change the text
    ("/v1/completions", {"model": "t1", "prompt": "France", "presence_penalty": 1.5}),
    ("/v1/chat/completions", {"model": "t1", "messages": [{"role": "user", "content": "France"}],
                              "response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"model": "t1", "messages": [{"role": "user", "content": "France"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}),
    # other servers' sampling settings (vLLM extra_body, TGI) were ignored in silence: the answer changes
    ("/v1/completions", {"model": "t1", "prompt": "France", "repetition_penalty": 5.0}),
    ("/v1/completions", {"model": "t1", "prompt": "France", "ignore_eos": True}),
    ("/v1/completions", {"model": "t1", "prompt": "France", "stop_token_ids": [11]}),
    ("/v1/completions", {"model": "t1", "prompt": "France", "min_tokens": 8}),
    ("/v1/chat/completions", {"model": "t1", "messages": [{"role": "user", "content": "France"}], "min_p": 0.5}),
    ("/v1/chat/completions", {"model": "t1", "messages": [{"role": "user", "content": "France"}],
                              "modalities": ["text", "audio"]}),
    ("/v1/chat/completions", {"model": "t1", "messages": [{"role": "user", "content": "France"}],
                              "tool_choice": "required"}),
    ("/v1/completions", {"model": "t1", "prompt": "France", "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"model": "t1", "prompt": "France", "stop": 5}),
    ("/v1/completions", {"model": "t1", "prompt": "France", "stop": [1]}),
]


@pytest.mark.parametrize(("path", "body", "cap"), [
    ("/v1/completions", {"model": "t1", "prompt": list(range(1000))}, "prompt lists take 1 to 64 texts"),
    ("/v1/classify", {"model": "t0", "input": list(range(1000))}, "input lists take 1 to 256 items"),
    ("/v1/completions", {"model": "t1", "prompt": "x", "stop": list(range(1000))}, "stop takes up to 4"),
])
def test_a_list_over_its_cap_is_refused_before_its_items_are_validated(setup, path, body, cap):
    # the caps were checked after pydantic had validated every item (a million items in 4 MB, on the event
    # loop): the error listed each bad item instead of the cap
    _, _, url = setup
    r = post(url + path, body)
    assert r.status_code == 422 and cap in r.text and r.text.count("Input should be") == 0, r.text[:300]


def test_openai_fields_at_their_defaults_are_accepted(setup):
    """What OpenAI clients send by default (empty logit_bias, zero penalties, a text response_format) is no
    reason to refuse a request; the same fields at other values are (HOSTILE)."""
    _, _, url = setup
    body = {"model": "t1", "prompt": "France", "max_tokens": 2, "temperature": 0, "logit_bias": {},
            "presence_penalty": 0, "frequency_penalty": 0.0, "response_format": {"type": "text"}, "user": "u",
            "repetition_penalty": 1.0, "min_p": 0, "ignore_eos": False, "stop_token_ids": [],
            "skip_special_tokens": True}
    r = post(url + "/v1/completions", body)
    assert r.status_code == 200, r.text
    r = post(url + "/v1/chat/completions", {"model": "t1", "messages": [{"role": "user", "content": "France"}],
                                             "max_tokens": 2, "modalities": ["text"], "tool_choice": "none"})
    assert r.status_code == 200, r.text
    # an explicit null is the field left out, as OpenAI reads it (it was a 422 for temperature, top_p, n, stream)
    nulls = dict.fromkeys(("temperature", "top_p", "top_k", "n", "stream", "seed", "stop", "stream_options",
                           "logprobs", "logit_bias", "presence_penalty", "response_format"))
    greedy = {"model": "t1", "prompt": "France", "max_tokens": 2, "temperature": 0}
    plain = post(url + "/v1/completions", {**greedy, **{k: v for k, v in nulls.items() if k != "temperature"}})
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["text"] == post(url + "/v1/completions", greedy).json()["choices"][0]["text"]
    chat = post(url + "/v1/chat/completions", {"model": "t1", "messages": [{"role": "user", "content": "France"}],
                                                "max_tokens": 2, **nulls, "max_completion_tokens": None,
                                                "top_logprobs": None})
    assert chat.status_code == 200, chat.text
    r = post(url + "/v1/completions", {**greedy, "model": None})  # a required field stays required
    assert r.status_code == 422 and "model" in r.text


def test_admin_unload_leaves_the_event_loop_free_while_it_waits(tokenizer, monkeypatch, tmp_path):
    """Unloading waits for the engine call in progress (a batch can take minutes): other requests are answered
    meanwhile, as during load and reload (it ran on the event loop and stalled every route)."""
    model = make_model("llama")
    engine = Engine(model, tokenizer)
    engine.add_base("base")
    engine.add_base("other")
    release, entered = threading.Event(), threading.Event()
    real = engine.unload

    def slow_unload(name):
        entered.set()
        assert release.wait(30)
        return real(name)

    monkeypatch.setattr(engine, "unload", slow_unload)
    from softprompt.store import PromptStore

    state = ServerState(engine, Scheduler(engine), admin_token=TOKEN, store=PromptStore(tmp_path, create=True))
    url, stop = serve(create_app(state))
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            unload = pool.submit(httpx.post, url + "/admin/tasks/other/unload",
                                 headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
            assert entered.wait(30)
            try:
                assert httpx.get(url + "/v1/models", timeout=5).status_code == 200
            finally:
                release.set()
            assert unload.result().status_code == 200
        assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"]] == ["base"]
    finally:
        release.set()
        stop()


@pytest.mark.parametrize("path,bad", HOSTILE)
def test_one_hostile_request_fails_alone_among_15_good_ones(setup, path, bad):
    state, _, url = setup
    goods = [("/v1/classify", {"model": f"t{2 * (i % 4)}", "input": w}, ClassifyRequest(f"t{2 * (i % 4)}", w))
             for i, w in enumerate(["good movie", "bad plot", "awful", "a very good film"] * 2)]
    goods += [("/v1/completions", {"model": "t1", "prompt": w, "max_tokens": 3, "temperature": 0.7, "seed": i},
               GenerateRequest("t1", w, max_tokens=3, temperature=0.7, seed=i))
              for i, w in enumerate(["France", "Spain", "Italy", "France", "Spain", "Italy", "France"])]
    jobs = goods[:8] + [(path, bad, None)] + goods[8:]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda j: post(url + j[0], j[1]), jobs))
    assert responses[8].status_code == 422, responses[8].text
    assert set(responses[8].json()["error"]) == {"message", "type", "param", "code"}
    for (p, _, ref), r in zip(jobs, responses, strict=True):
        if ref is None:
            continue
        assert r.status_code == 200, (p, r.text)
        if p == "/v1/classify":
            assert r.json()["data"][0]["label"] == state.engine.classify([ref])[0].label
        else:
            assert r.json()["choices"][0]["text"] == state.engine.generate([ref])[0].text


def test_a_tiny_temperature_samples_the_best_token_instead_of_failing(setup):
    state, _, url = setup
    r = httpx.post(url + "/v1/completions", json={"model": "t1", "prompt": "France", "temperature": 1e-300,
                                                  "max_tokens": 4, "seed": 3}, timeout=60)
    greedy = state.engine.generate([GenerateRequest("t1", "France", max_tokens=4)])[0]
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy.text


def test_engine_failure_of_one_row_fails_alone_whatever_the_exception(setup, monkeypatch):
    state, _, _ = setup
    engine = state.engine
    real = engine.run

    def run(kind, items, on_token=None, cancelled=None, **kw):
        if any(p.request.input == "boom" for p in items):
            raise RuntimeError("a row that breaks the forward")
        return real(kind, items, on_token, cancelled, **kw)

    monkeypatch.setattr(engine, "run", run)
    sched = Scheduler(engine, max_batch_requests=16, max_wait_ms=200)
    sched.start()
    try:
        texts = ["good", "bad", "boom", "great", "awful", "the film", "a plot", "not bad"]
        futures = [sched.submit("classify", ClassifyRequest("t0", t)) for t in texts]
        for t, f in zip(texts, futures, strict=True):
            if t == "boom":
                with pytest.raises(RuntimeError, match="breaks the forward"):
                    f.result(60)
            else:
                assert f.result(60).label == real("classify", [engine.prepare("classify",
                                                                              ClassifyRequest("t0", t))])[0].label
        assert sched.stats.failed == 1 and sched.stats.largest_batch > 1
    finally:
        sched.stop()


def _raw_requests(url: str, requests: list[bytes]) -> list[tuple[int, bytes]]:
    """Send HTTP/1.1 requests one after another on ONE connection; (status, body) of each."""
    host, port = url.removeprefix("http://").split(":")
    out = []
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        f = sock.makefile("rb")
        for req in requests:
            sock.sendall(req)
            status_line = f.readline()
            assert status_line, "the server closed the connection"
            headers = {}
            while (line := f.readline()) not in (b"\r\n", b""):
                k, v = line.decode().split(":", 1)
                headers[k.strip().lower()] = v.strip()
            assert headers.get("connection") != "close", headers
            out.append((int(status_line.split()[1]), f.read(int(headers["content-length"]))))
    return out


def _post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_a_500_answers_json_and_keeps_the_connection(setup, monkeypatch):
    state, _, url = setup
    real = state.engine.task_names

    def broken():
        if threading.current_thread() is threading.main_thread():
            return real()
        raise RuntimeError("a bug")

    monkeypatch.setattr(state.engine, "task_names", broken)
    get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    (s1, b1), (s2, b2), (s3, _) = _raw_requests(url, [get, get, _post("/v1/classify", b'{"model": "t0", '
                                                                                     b'"input": "good"}')])
    assert s1 == s2 == 500 and b"internal error: RuntimeError: a bug" in b1
    assert httpx.Response(500, content=b1).json()["error"]["type"] == "server_error"
    assert s3 == 200


def test_framework_errors_use_the_openai_shape(setup):
    _, _, url = setup
    as_json = {"content-type": "application/json"}
    cases = [httpx.get(url + "/nope"), httpx.get(url + "/v1/completions"),
             httpx.post(url + "/v1/completions", content=b"{not json", headers=as_json),
             httpx.post(url + "/v1/completions", content=b"x" * (70 * 1024), headers=as_json)]
    assert [r.status_code for r in cases] == [404, 405, 422, 413]
    for r in cases:
        err = r.json()["error"]
        # OpenAI's shape as typed clients declare it: param null, code a string
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == str(r.status_code)
        assert err["param"] is None and err["message"]


def test_a_chunked_body_over_the_limit_is_413(setup):
    _, _, url = setup

    def chunks():
        for _ in range(80):
            yield b"x" * 1024

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 65536 bytes" in r.json()["error"]["message"]


def test_character_limits_come_before_tokenising(setup, monkeypatch):
    state, _, url = setup
    monkeypatch.setattr(state.engine, "prepare", lambda *a, **k: pytest.fail("tokenised a text over the limit"))
    for path, body in [("/v1/completions", {"model": "t1", "prompt": ["France", "good " * 500]}),
                       ("/v1/classify", {"model": "t0", "input": [{"text": "a" * 2001}]}),
                       ("/v1/score", {"model": "t1", "input": "x", "continuation": "y" * 2001}),
                       ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user",
                                                                                "content": "z" * 2001}]})]:
        r = httpx.post(url + path, json=body)
        assert r.status_code == 400 and "limit of 2000" in r.json()["error"]["message"], (path, r.text)


def test_metrics_label_routes_not_raw_paths(setup):
    _, _, url = setup
    for i in range(50):
        httpx.post(f"{url}/admin/tasks/evil%22%7D%20{i}/load")
        httpx.get(f"{url}/junk/{i}")
    text = httpx.get(url + "/metrics").text
    assert "evil" not in text and "junk" not in text
    assert 'endpoint="/admin/tasks/{name}/load",code="401"' in text
    assert 'endpoint="unmatched",code="404"' in text
    sample = re.compile(r'^[a-z_]+(\{([a-z]+="[^"\\]*",?)+\})? -?[0-9.e+-]+$')
    bad = [ln for ln in text.splitlines() if not ln.startswith("#") and not sample.match(ln)]
    assert not bad, bad


def test_preparing_a_request_blocks_neither_the_event_loop_nor_the_batches(setup, monkeypatch):
    state, _, url = setup
    engine = state.engine
    release, entered = threading.Event(), threading.Event()
    real = engine.prepare

    def prepare(kind, req, index=None):
        if req.input == "slow":
            entered.set()
            assert release.wait(60)
        return real(kind, req, index)

    monkeypatch.setattr(engine, "prepare", prepare)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(httpx.post, url + "/v1/classify", json={"model": "t0", "input": "slow"}, timeout=60)
        try:
            assert entered.wait(30)
            assert httpx.get(url + "/health", timeout=5).status_code == 200  # the event loop is free
            fast = httpx.post(url + "/v1/classify", json={"model": "t2", "input": "good"}, timeout=30)
            assert fast.status_code == 200 and not slow.done()  # the batch ran without the slow request
        finally:
            release.set()
        assert slow.result().status_code == 200


def test_a_slow_chat_template_does_not_block_the_event_loop(setup, monkeypatch):
    state, _, url = setup
    tok = state.engine.tok
    release, entered = threading.Event(), threading.Event()

    def apply_chat_template(messages, **kwargs):
        entered.set()
        assert release.wait(60)
        return "".join(m["content"] for m in messages)

    monkeypatch.setattr(tok, "chat_template", "{{ messages }}", raising=False)
    monkeypatch.setattr(tok, "apply_chat_template", apply_chat_template)
    body = {"model": "base", "messages": [{"role": "user", "content": "good movie"}], "max_tokens": 2,
            "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        chat = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
        try:
            assert entered.wait(30)
            assert httpx.get(url + "/health", timeout=5).status_code == 200  # answered while the template runs
        finally:
            release.set()
        assert chat.result().status_code == 200


def _slow_decode(monkeypatch, engine, seen: list):
    """Each decode step takes 20 ms more; ``seen`` gets the token counts of every generation that ended."""
    from softprompt.engine.running import RunningBatch

    real_step, real_finish = RunningBatch.step, RunningBatch._finish

    def step(self):
        time.sleep(0.02)
        return real_step(self)

    def finish(self, row, reason):
        if row in self.rows:
            seen.append(len(row.tokens))
        return real_finish(self, row, reason)

    monkeypatch.setattr(RunningBatch, "step", step)
    monkeypatch.setattr(RunningBatch, "_finish", finish)


def _long_input(engine) -> str:
    for text in ["the movie was", "good", "France", "a plot", "Italy Rome"]:
        if engine.generate([GenerateRequest("base", text, raw=True, max_tokens=60)])[0].finish_reason == "length":
            return text
    pytest.skip("the random model ends every probe early")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_generation(setup, monkeypatch, stream):
    state, _, url = setup
    text = _long_input(state.engine)
    seen: list[int] = []
    _slow_decode(monkeypatch, state.engine, seen)
    body = {"model": "base", "prompt": text, "raw": True, "max_tokens": 60, "temperature": 0, "stream": stream}
    if stream:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            next(r.iter_lines())  # one chunk, then hang up
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=0.4)
    for _ in range(200):
        if seen:
            break
        time.sleep(0.05)
    assert seen and seen[0] < 60, seen


def test_admission_is_all_or_nothing(setup, monkeypatch):
    state, _, _ = setup
    engine = state.engine
    texts = [WORDS[i % len(WORDS)] for i in range(64)]  # each admitted request gets its own result
    refs = engine.classify([ClassifyRequest("t0", t) for t in texts])  # before the engine is held
    gate, ran = gate_runs(monkeypatch, engine)
    sched = Scheduler(engine, max_batch_requests=16, max_wait_ms=5, max_queue=64)
    sched.start()
    try:
        first = sched.submit_many("classify", [ClassifyRequest("t0", t) for t in texts])
        with pytest.raises(QueueFullError):
            sched.submit_many("classify", [ClassifyRequest("t2", "bad")] * 64)
        gate.set()
        got = [j.future.result(60) for j in first]
        assert [r.label for r in got] == [r.label for r in refs]
        assert [r.probs for r in got] == [pytest.approx(r.probs, abs=1e-5) for r in refs]
        assert len(ran) == 64 and {p.task.name for p in ran} == {"t0"}
    finally:
        gate.set()
        sched.stop()


def test_two_64_prompt_requests_against_max_queue_64_run_only_the_admitted_one(tokenizer, monkeypatch):
    engine = Engine(make_model("llama"), tokenizer)
    engine.add_base("base")
    gate, rows = gate_runs(monkeypatch, engine)
    state = ServerState(engine, Scheduler(engine, max_batch_requests=16, max_queue=64))
    body = {"model": "base", "prompt": ["the movie"] * 64, "raw": True, "max_tokens": 1}
    with TestClient(create_app(state)) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        a = pool.submit(client.post, "/v1/completions", json=body)
        for _ in range(200):
            if state.scheduler.depth() or state.scheduler.stats.batches:
                break
            time.sleep(0.01)
        b = client.post("/v1/completions", json=body)
        gate.set()
        assert b.status_code == 429 and b.json()["error"]["type"] == "rate_limit_error"
        assert a.result().status_code == 200
    assert len(rows) == 64


def test_admin_token_is_compared_in_constant_time(setup, monkeypatch):
    import hmac

    _, _, url = setup
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    r = httpx.post(url + "/admin/tasks/t0/unload", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert calls == [(b"Bearer wrong", f"Bearer {TOKEN}".encode())]


def test_admin_token_from_a_file(tmp_path, tiny_model_dir):
    from softprompt.config import ConfigError, ModelArgs, ServeArgs
    from softprompt.server.assemble import build_app

    token = tmp_path / "token"
    token.write_text("\ufefffrom-a-file\n", encoding="utf-8")  # a byte order mark (Windows editors) is not the token
    app = build_app({"model": ModelArgs(model=str(tiny_model_dir), device="cpu"),
                     "serve": ServeArgs(admin_token_file=str(token))})
    with TestClient(app) as client:
        assert client.post("/admin/tasks/base/unload", headers={"Authorization": "Bearer x"}).status_code == 401
        r = client.post("/admin/tasks/base/unload", headers={"Authorization": "Bearer from-a-file"})
        assert r.status_code == 400 and "no --store" in r.json()["error"]["message"]  # past the token check
    with pytest.raises(ConfigError, match="--admin-token-file"):
        ServeArgs(admin_token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="both given"):
        ServeArgs(admin_token="a", admin_token_file=str(token))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        build_app({"model": ModelArgs(model=str(tiny_model_dir), device="cpu"),
                   "serve": ServeArgs(admin_token_file=str(tmp_path / "empty"))})


def test_requests_per_batch_and_rows_per_forward_are_separate_limits(tiny_model_dir, monkeypatch):
    """--max-batch-requests sizes the scheduler's batches, --max-batch-rows the engine's forwards (a request
    can take several rows); --max-batch-size is still taken as the old name of the first."""
    from softprompt.cli import build_parser
    from softprompt.config import ConfigError, ModelArgs, ServeArgs
    from softprompt.server import assemble

    seen = {}
    monkeypatch.setattr(assemble, "create_app", lambda state: seen.setdefault("state", state))
    assemble.build_app({"model": ModelArgs(model=str(tiny_model_dir), device="cpu"),
                        "serve": ServeArgs(max_batch_requests=5, max_batch_rows=3)})
    state = seen["state"]
    assert (state.scheduler.max_batch_requests, state.engine.max_batch_rows) == (5, 3)
    ns = build_parser().parse_args(["serve", "--max-batch-size", "7", "--max-batch-rows", "2"])
    assert (ns.max_batch_requests, ns.max_batch_rows) == (7, 2)
    with pytest.raises(ConfigError, match="--max-batch-rows must be >= 1"):
        ServeArgs(max_batch_rows=0)


def test_a_chat_template_that_refuses_the_conversation_is_a_422(setup, monkeypatch):
    state, _, url = setup
    # what Llama-2, Mistral and Gemma templates do when the roles do not alternate
    monkeypatch.setattr(state.engine.tok, "chat_template", "{{ raise_exception('roles must alternate') }}",
                        raising=False)
    body = {"model": "base", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "max_tokens": 2}
    r = post(url + "/v1/chat/completions", body)
    assert r.status_code == 422, r.text
    assert "roles must alternate" in r.json()["error"]["message"]


def test_the_base_task_and_a_store_entry_never_share_a_name(setup, tmp_path, tokenizer, tiny_model_dir):
    from softprompt.config import ConfigError, ModelArgs, ServeArgs
    from softprompt.engine import RequestError
    from softprompt.server.assemble import build_app

    state, _, url = setup
    store = make_store(tmp_path / "store", make_model("llama"), tokenizer)
    for serve_args in (ServeArgs(store=str(store.root), base_task="t1"),
                       ServeArgs(store=str(store.root), tasks=["t1", "t2"], base_task="t2")):
        with pytest.raises(ConfigError, match=r"--base-task 't\d': the store .* has an entry of that name"):
            build_app({"model": ModelArgs(model=str(tiny_model_dir), device="cpu"), "serve": serve_args})
    # --tasks leaves the entry out: the name is free for the base model
    app = build_app({"model": ModelArgs(model=str(tiny_model_dir), device="cpu"),
                     "serve": ServeArgs(store=str(store.root), tasks=["t1"], base_task="t2", admin_token=TOKEN)})
    with TestClient(app) as client:
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"t1", "t2"}
    with pytest.raises(RequestError, match="already served with a prompt"):
        state.engine.add_base("t1")
    # an admin load over the base task is refused, and the base model still answers
    r = httpx.post(url + "/admin/tasks/base/load", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 422 and "is the plain base model" in r.json()["error"]["message"]
    assert state.engine.describe("base")["kind"] == "base"
    r = post(url + "/v1/completions", {"model": "base", "prompt": "the movie", "max_tokens": 2})
    assert r.status_code == 200, r.text


# ----- serve's startup: what would start a server that cannot work is refused before it listens -------------


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_wait_ms", 1e13, "--max-wait-ms must be in [0, 60000]"),  # past threading.TIMEOUT_MAX: the worker died
    ("host", "", "--host must be an address or host name"),  # '' listened on every interface
    ("admin_token", "", "--admin-token is empty"),  # fell through to the environment's token
    ("admin_token", " s3cret", "--admin-token starts or ends with whitespace"),  # HTTP strips it: always 401
    ("admin_token", "pässwort", "--admin-token must be printable ASCII"),  # read back as Latin-1: always 401
])
def test_serve_settings_that_cannot_work_are_refused(field, value, message):
    from softprompt.config import ConfigError, ServeArgs

    with pytest.raises(ConfigError, match=re.escape(message)):
        ServeArgs(store="s", **{field: value})


def test_serve_refuses_a_busy_port_a_bad_env_token_and_nothing_to_serve(tmp_path, tiny_model_dir, monkeypatch):
    from softprompt.config import ConfigError, ModelArgs, ServeArgs
    from softprompt.server.assemble import build_app, check_listen
    from softprompt.store import PromptStore

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--host 127.0.0.1 --port {port}: cannot listen there"):
            check_listen("127.0.0.1", port)  # before the model loads (uvicorn found it after, exit 3)
    with pytest.raises(ConfigError, match="--host 'no.such.host.invalid': cannot resolve it"):
        check_listen("no.such.host.invalid", 8000)
    store = PromptStore(tmp_path / "empty", create=True)
    args = {"model": ModelArgs(model=str(tiny_model_dir)), "serve": ServeArgs(store=str(store.root), base_task="")}
    with pytest.raises(ConfigError, match="nothing to serve: the store .* has no entry that loads"):
        build_app(args)  # it listened, serving 0 tasks, answering 404 to everything
    # with an admin token the empty store can be filled while serving: it starts
    assert build_app({**args, "serve": ServeArgs(store=str(store.root), base_task="", admin_token="s3cret")})
    monkeypatch.setenv("SOFTPROMPT_ADMIN_TOKEN", "tab\tin it")
    with pytest.raises(ConfigError, match="SOFTPROMPT_ADMIN_TOKEN must be printable ASCII"):
        build_app({**args, "serve": ServeArgs(store=str(store.root))})


def test_a_cancelled_request_at_the_head_of_the_queue_does_not_block_the_live_ones(tokenizer):
    """The continuous scheduler checked a pending generation's room before whether its client had left: a large
    cancelled one at the head held every live one behind it until the running batch had room for it."""
    from concurrent.futures import Future

    from softprompt.server.scheduler import Job

    engine = Engine(make_model("llama"), tokenizer)
    sched = Scheduler(engine)

    class Batch:  # room for the small request only
        def __init__(self):
            self.admitted = []

        def room(self, item):
            return item == "small"

        def admit(self, item, *callbacks):
            self.admitted.append(item)

        def __len__(self):
            return len(self.admitted)

    big, small = Job("generate", "big", Future()), Job("generate", "small", Future())
    big.cancel()
    sched._pending.extend([big, small])
    batch = Batch()
    sched._admit(batch)
    assert batch.admitted == ["small"] and not sched._pending and sched.stats.cancelled == 1


def test_the_model_list_skips_a_task_unloaded_while_it_is_read(setup, monkeypatch):
    # GET /v1/models read the names, then described each: an unload in between made the whole list a 404
    from softprompt.engine import UnknownTaskError

    state, _, url = setup
    real = state.engine.describe

    def gone(name):
        if name == "t3":
            raise UnknownTaskError(f"unknown task {name!r}")
        return real(name)

    monkeypatch.setattr(state.engine, "describe", gone)
    r = httpx.get(url + "/v1/models", timeout=60)
    assert r.status_code == 200 and "t3" not in {m["id"] for m in r.json()["data"]} and len(r.json()["data"]) > 1
