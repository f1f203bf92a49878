"""The continuous scheduler: short requests do not wait for a running long generation; TTFT in /metrics."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from softprompt.config import ConfigError, ServeArgs  # noqa: E402
from softprompt.engine import ClassifyRequest, Engine, GenerateRequest  # noqa: E402
from softprompt.engine.running import RunningBatch  # noqa: E402
from softprompt.server import Scheduler, ServerState, create_app  # noqa: E402
from tests.conftest import make_model  # noqa: E402
from tests.test_engine import CAPS, SENT, stored  # noqa: E402


@pytest.fixture
def engine(tmp_path, tokenizer, monkeypatch):
    model = make_model("llama")
    engine = Engine(model, tokenizer, max_batch_rows=8)
    engine.add_prompt("sent", stored(tmp_path, model, tokenizer, "sent", 3, SENT, 1))
    engine.add_prompt("caps", stored(tmp_path, model, tokenizer, "caps", 2, CAPS, 2))
    engine.add_base("base")
    real_step = RunningBatch.step

    def slow_step(self):  # 15 ms per decode step: a 60-token generation takes about a second
        time.sleep(0.015)
        return real_step(self)

    monkeypatch.setattr(RunningBatch, "step", slow_step)
    return engine


def _long(engine) -> GenerateRequest:
    for text in ["the movie was", "good", "France", "a plot", "Italy Rome"]:
        req = GenerateRequest("base", text, raw=True, max_tokens=60)
        if engine.generate([req])[0].finish_reason == "length":
            return req
    pytest.skip("the random model ends every probe early")


def _race(engine, policy: str, short_kind: str, short) -> tuple[bool, object, object]:
    """Start the long generation, send ``short`` once it has 3 tokens: did the short one end first?"""
    sched = Scheduler(engine, max_batch_requests=8, max_wait_ms=1, policy=policy)
    assert sched.policy == policy
    sched.start()
    try:
        started = threading.Event()
        long_f = sched.submit("generate", _long(engine), on_token=lambda toks, lps: len(toks) >= 3 and started.set())
        assert started.wait(30)
        short_f = sched.submit(short_kind, short)
        short_res = short_f.result(60)
        long_running = not long_f.done()
        return long_running, short_res, long_f.result(60)
    finally:
        sched.stop()


@pytest.mark.parametrize("short_kind,short", [
    ("generate", GenerateRequest("caps", {"country": "France"}, max_tokens=4)),
    ("classify", ClassifyRequest("sent", "a fine film")),
])
def test_a_short_request_does_not_wait_for_a_running_long_generation(engine, short_kind, short):
    first, short_res, long_res = _race(engine, "continuous", short_kind, short)
    assert first, "the short request waited for the long generation"
    alone = (engine.generate if short_kind == "generate" else engine.classify)([short])[0]
    assert short_res == alone  # joining mid-flight changes nothing
    assert long_res.tokens == engine.generate([_long(engine)])[0].tokens
    first_batch, _, _ = _race(engine, "batch", short_kind, short)
    assert not first_batch  # batch-at-a-time: it waits for the running batch to end


def test_a_large_classification_request_shares_the_steps_with_running_generations(engine):
    """32 inputs with max_batch_requests 8: the streams get decode steps between chunks of 8, not after all 32."""
    sched = Scheduler(engine, max_batch_requests=8, max_wait_ms=1)
    sched.start()
    try:
        started, seen, jobs = threading.Event(), [], []

        def on_token(toks, lps):
            if len(toks) >= 3:
                started.set()
            if jobs:
                seen.append(sum(j.future.done() for j in jobs))

        long_f = sched.submit("generate", _long(engine), on_token=on_token)
        assert started.wait(30)
        reqs = [ClassifyRequest("sent", f"review number {i}") for i in range(32)]
        jobs.extend(sched.submit_many("classify", reqs))
        results = [j.future.result(60) for j in jobs]
        long_f.result(60)
    finally:
        sched.stop()
    assert any(0 < n < 32 for n in seen), f"no decode step ran while the classification was partly done: {seen}"
    assert results == engine.classify(reqs)  # chunked, the answers are the same


def test_ttft_and_the_running_batch_are_in_metrics(engine):
    state = ServerState(engine, Scheduler(engine, max_wait_ms=1))
    with TestClient(create_app(state)) as client:
        r = client.post("/v1/completions", json={"model": "caps", "prompt": "Spain", "max_tokens": 3})
        assert r.status_code == 200
        text = client.get("/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["softprompt_time_to_first_token_seconds_count"]) == 1
    assert 0 < float(lines["softprompt_time_to_first_token_seconds_sum"]) < 30
    assert lines["softprompt_continuous_batching"] == "1" and float(lines["softprompt_decode_steps_total"]) >= 2
    assert lines["softprompt_running_generations"] == "0" and lines["softprompt_kv_slot_bytes"] == "0"


def test_a_model_the_running_batch_cannot_serve_falls_back_to_batch_at_a_time(engine, monkeypatch):
    monkeypatch.setattr(engine.backend, "_slots_problem", "slot attention differs on this model")
    sched = Scheduler(engine, policy="continuous")
    assert sched.policy == "batch"
    with pytest.raises(ValueError, match="policy must be"):
        Scheduler(engine, policy="fifo")


def test_serve_flags_are_checked():
    with pytest.raises(ConfigError, match="--scheduler must be continuous or batch"):
        ServeArgs(scheduler="fifo")
    with pytest.raises(ConfigError, match="--prefill-chunk must be >= 1"):
        ServeArgs(prefill_chunk=0)


def test_a_failing_sample_fails_its_row_alone_and_a_failing_step_does_not_stop_the_scheduler(tokenizer,
                                                                                             monkeypatch):
    """Sampling (outside the per-row forward isolation) raising for one row fails that row only; a step that
    raises where no row is to blame fails the running rows and the scheduler keeps serving (the worker thread
    died: admitted requests were never answered, every later one was refused)."""
    import softprompt.engine.running as running

    engine = Engine(make_model("llama"), tokenizer, max_batch_rows=8)
    engine.add_base("base")
    real_sample = running.sample_next

    def sample(logits, temperature, *args):
        if temperature == 0.5:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(logits, temperature, *args)

    monkeypatch.setattr(running, "sample_next", sample)
    greedy = GenerateRequest("base", "the movie was", raw=True, max_tokens=4)
    reference = engine.generate([greedy])[0]
    sched = Scheduler(engine, max_batch_requests=8, max_wait_ms=20)
    sched.start()
    try:
        bad = sched.submit("generate", GenerateRequest("base", "good", raw=True, max_tokens=4, temperature=0.5,
                                                       seed=1))
        good = sched.submit("generate", greedy)
        with pytest.raises(RuntimeError, match="probability tensor"):
            bad.result(30)
        assert good.result(30).tokens == reference.tokens
        real_emit, calls = RunningBatch._emit, []

        def emit_once_broken(self, ready):
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("a bug in a decode step")
            return real_emit(self, ready)

        monkeypatch.setattr(RunningBatch, "_emit", emit_once_broken)
        with pytest.raises(ValueError, match="a bug in a decode step"):
            sched.submit("generate", greedy).result(30)
        assert sched.submit("generate", greedy).result(30).tokens == reference.tokens  # still serving
    finally:
        sched.stop()


@pytest.mark.parametrize("path", ["running batch", "batch-at-a-time decode"])
def test_batch_policy_fails_a_failing_request_alone_without_running_the_others_again(tokenizer, path):
    """A request whose stream raised failed the engine call; the batch policy then ran each half again, so the
    others generated (and streamed) twice; on the batch-at-a-time decode the stream's error failed every row."""
    engine = Engine(make_model("llama"), tokenizer, max_batch_rows=8)
    engine.add_base("base")
    if path != "running batch":
        engine.backend._slots_problem = "off: the batch-at-a-time path is under test"
    good_req = GenerateRequest("base", "the movie was", raw=True, max_tokens=4)
    reference = engine.generate([good_req])[0]
    calls, streamed = [], []
    real_run = engine.run

    def run(*a, **k):
        calls.append(1)
        return real_run(*a, **k)

    engine.run = run

    def broken(toks, lps):
        raise ConnectionError("the client's stream broke")

    sched = Scheduler(engine, max_batch_requests=8, max_wait_ms=200, policy="batch")
    sched.start()
    try:
        bad = sched.submit("generate", GenerateRequest("base", "good", raw=True, max_tokens=4), on_token=broken)
        good = sched.submit("generate", good_req, on_token=lambda toks, lps: streamed.append(list(toks)))
        with pytest.raises(ConnectionError, match="stream broke"):
            bad.result(30)
        assert good.result(30).tokens == reference.tokens
    finally:
        sched.stop()
    assert len(calls) == 1  # one engine call: nothing ran again
    assert streamed == [reference.tokens[:k] for k in range(1, len(reference.tokens) + 1)]  # streamed once
