"""Fairness between clients: round-robin order of waiting requests, and a per-client share of the queue."""

from __future__ import annotations

import concurrent.futures
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from softprompt.config import ConfigError, ServeArgs  # noqa: E402
from softprompt.engine import ClassifyRequest, Engine  # noqa: E402
from softprompt.server import Scheduler, ServerState, create_app  # noqa: E402
from softprompt.server.fair import FairQueue  # noqa: E402
from softprompt.server.scheduler import OverShareError, QueueFullError  # noqa: E402
from tests.conftest import gate_runs, make_model  # noqa: E402
from tests.test_engine import SENT, TEXTS, stored  # noqa: E402


def _wait_for(condition) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def engine(tmp_path, tokenizer):
    model = make_model("llama")
    engine = Engine(model, tokenizer, max_batch_rows=8)
    engine.add_prompt("sent", stored(tmp_path, model, tokenizer, "sent", 3, SENT, 1))
    return engine


def test_fair_queue_takes_clients_round_robin_each_in_arrival_order():
    q = FairQueue()
    for client, n in (("a", 4), ("b", 1), ("c", 2)):
        for i in range(n):
            q.push(SimpleNamespace(client=client, i=i))
    assert len(q) == 7
    order = []
    while len(q):
        head = q.peek()
        job = q.pop()
        assert job is head
        order.append((job.client, job.i))
    assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2), ("a", 3)]
    q.push(SimpleNamespace(client="b", i=0))  # a client that comes back joins the end of the round
    q.push(SimpleNamespace(client="a", i=0))
    assert [q.pop().client, q.pop().client] == ["b", "a"]
    with pytest.raises(IndexError):
        q.pop()


@pytest.mark.parametrize("policy", ["continuous", "batch"])
def test_another_clients_request_does_not_wait_behind_a_large_one(engine, monkeypatch, policy):
    """Client a queues 6 inputs, then client b 1: b's runs in the next batch, not after all of a's."""
    gate, ran = gate_runs(monkeypatch, engine)
    sched = Scheduler(engine, max_batch_requests=2, max_wait_ms=1, policy=policy)
    sched.start()
    try:
        held = sched.submit("classify", ClassifyRequest("sent", "held"), client="x")
        assert gate.entered.wait(30)  # the worker is inside the engine with it; the rest wait
        a = sched.submit_many("classify", [ClassifyRequest("sent", t) for t in TEXTS + ["one more"]], client="a")
        (b,) = sched.submit_many("classify", [ClassifyRequest("sent", "the film is good")], client="b")
        assert sched.depth() == 7 and sched.clients_waiting() == 2
        gate.set()
        results = [j.future.result(30) for j in [*a, b]] + [held.result(30)]
    finally:
        gate.set()
        sched.stop()
    assert all(r.label in ("positive", "negative") for r in results)
    order = [item for item in ran if item is not None]
    position = next(k for k, item in enumerate(order) if item is b.item)
    # the held request, then one batch of 2: a's first input and b's (FIFO ran b's last, at position 7)
    assert position == 2, position
    assert [k for k, item in enumerate(order) if any(item is j.item for j in a)] == [1, 3, 4, 5, 6, 7]
    assert sched.clients_waiting() == 0 and sched.depth() == 0


@pytest.mark.parametrize("policy", ["continuous", "batch"])
def test_one_client_cannot_fill_the_queue_the_others_still_get_in(engine, monkeypatch, policy):
    gate, ran = gate_runs(monkeypatch, engine)
    sched = Scheduler(engine, max_batch_requests=4, max_wait_ms=1, max_queue=100, max_queue_per_client=3,
                      policy=policy)
    sched.start()
    try:
        held = sched.submit("classify", ClassifyRequest("sent", "held"), client="a")
        assert gate.entered.wait(30)
        first = sched.submit_many("classify", [ClassifyRequest("sent", t) for t in TEXTS[:3]], client="a")
        with pytest.raises(QueueFullError, match=r"this client's share of the queue is full \(3 of its 3"):
            sched.submit("classify", ClassifyRequest("sent", "more"), client="a")
        with pytest.raises(OverShareError, match="brings 4 texts, more than a client's whole share"):
            sched.submit_many("classify", [ClassifyRequest("sent", t) for t in TEXTS[:4]], client="b")
        other = sched.submit_many("classify", [ClassifyRequest("sent", t) for t in TEXTS[:3]], client="b")
        assert sched.depth() == 6 and sched.clients_waiting() == 2
        gate.set()
        for job in [*first, *other]:
            assert job.future.result(30).label in ("positive", "negative")
        held.result(30)
        # the share frees as a client's requests run: a can queue 3 again
        again = sched.submit_many("classify", [ClassifyRequest("sent", t) for t in TEXTS[:3]], client="a")
        assert all(j.future.result(30).label for j in again)
    finally:
        gate.set()
        sched.stop()
    assert sched.clients_waiting() == 0 and len(ran) == 10


def test_client_must_be_text(engine):
    sched = Scheduler(engine)
    sched.start()
    try:
        with pytest.raises(TypeError, match="client must be a str"):
            sched.submit_many("classify", [ClassifyRequest("sent", "x")], client=7)
    finally:
        sched.stop()


def test_the_client_header_names_the_client_and_its_share_is_429(engine, monkeypatch):
    """With --client-header, each key has its own share of the queue; without the header, the peer address."""
    gate, _ = gate_runs(monkeypatch, engine)
    sched = Scheduler(engine, max_batch_requests=8, max_wait_ms=1, max_queue=100, max_queue_per_client=2)
    app = create_app(ServerState(engine, sched, client_header="X-API-Key"))

    def classify(client, key, n):
        headers = {"X-API-Key": key} if key else {}
        return client.post("/v1/classify", json={"model": "sent", "input": TEXTS[:n]}, headers=headers)

    with TestClient(app) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        try:
            held = pool.submit(classify, client, "key-held", 1)
            assert gate.entered.wait(30)
            over = pool.submit(classify, client, "key-a", 3).result(30)  # more than a share of 2: never admissible
            a = pool.submit(classify, client, "key-a", 2)
            _wait_for(lambda: sched.depth() == 2)
            a_more = pool.submit(classify, client, "key-a", 1).result(30)
            b = pool.submit(classify, client, "key-b", 2)  # another key: admitted
            anon = pool.submit(classify, client, None, 2)  # no header: the peer address's share
            _wait_for(lambda: sched.depth() == 6)
            assert client.get("/metrics").text.count("softprompt_queue_clients 3") == 1
            anon_more = pool.submit(classify, client, None, 1).result(30)
            too_big = pool.submit(classify, client, "key-c", 3).result(30)  # over any client's share: never
        finally:
            gate.set()
        assert too_big.status_code == 400 and "more than a client's whole share" in too_big.text
        assert [r.status_code for r in (a_more, anon_more)] == [429] * 2 and over.status_code == 400
        assert all("this client's share of the queue is full" in r.json()["error"]["message"]
                   and r.headers["retry-after"] == "1" for r in (a_more, anon_more))
        assert "key-a" not in over.json()["error"]["message"]
        for f in (held, a, b, anon):
            r = f.result(60)
            assert r.status_code == 200, r.text
            assert all(c["label"] in ("positive", "negative") for c in r.json()["data"])


@pytest.mark.parametrize("flags, problem", [
    ({"max_queue_per_client": -1}, "--max-queue-per-client must be >= 0"),
    ({"client_header": "X API Key"}, "--client-header must be an HTTP header name"),
    ({"client_header": ""}, "--client-header must be an HTTP header name"),
])
def test_bad_fairness_flags_are_refused(flags, problem):
    with pytest.raises(ConfigError, match=problem):
        ServeArgs(**flags)
