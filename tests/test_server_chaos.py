"""Chaos: good and hostile requests mixed concurrently against a live server (127.0.0.1 only), while an
operator loads, unloads and reloads good and broken store entries. Bounded in count and time.

Expected: no 5xx; every good request gets the answer it gets alone; /health answers throughout; nothing in
the store is lost or changed.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import shutil
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from softprompt.engine import ClassifyRequest, Engine, GenerateRequest, ScoreRequest  # noqa: E402
from softprompt.methods import build_method  # noqa: E402
from softprompt.server import Scheduler, ServerState, create_app  # noqa: E402
from softprompt.store import META_NAME, WEIGHTS_NAME, PromptStore  # noqa: E402
from tests.conftest import make_model, serve  # noqa: E402
from tests.test_server import TOKEN, WORDS, make_store  # noqa: E402
from tests.test_server_hostile import HOSTILE, post  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}
STABLE = [f"t{i}" for i in range(6)]  # always served: their answers must never change
CHURN = ["t6", "t7"]  # unloaded and loaded again while requests for them arrive (404 or the right answer)
DEADLINE_S = 240


def break_entries(store: PromptStore) -> list[str]:
    """Copies of t0 broken in ways a careless operator or a hostile file would break them."""
    broken = {"bad_template": lambda m: m["task"].update(template=123),
              "bad_spec": lambda m: m["task"].update(template="Review: {text:d}"),
              "bad_dropout": lambda m: m["method_config"].update(dropout=None),
              "bad_verbalizer": lambda m: m["task"].update(verbalizer=["positive", "negative"]),
              "bad_weights": None}
    for name, edit in broken.items():
        shutil.copytree(store.path("t0"), store.root / name)
        if edit is None:
            (store.root / name / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
            continue
        meta = json.loads((store.root / name / META_NAME).read_text())
        edit(meta)
        (store.root / name / META_NAME).write_text(json.dumps(meta))
    return list(broken)


def fingerprint_store(store: PromptStore) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(store.root.glob("*/*")) if p.is_file()}


def good_jobs(n: int, rng: random.Random) -> list[tuple[str, dict, object]]:
    jobs = []
    for _ in range(n):
        task = rng.choice(STABLE + CHURN)
        text = rng.choice(WORDS)
        if int(task[1]) % 2 == 0:
            if rng.random() < 0.5:
                jobs.append(("/v1/classify", {"model": task, "input": text}, ("classify", ClassifyRequest(task, text))))
            else:
                jobs.append(("/v1/score", {"model": task, "input": text, "continuation": " positive"},
                             ("score", ScoreRequest(task, text, " positive"))))
        else:
            seed = rng.randrange(1000) if rng.random() < 0.5 else None
            temperature = 0.9 if seed is not None else 0.0
            body = {"model": task, "prompt": text, "max_tokens": 4, "temperature": temperature, "seed": seed}
            jobs.append(("/v1/completions", body, ("generate", GenerateRequest(task, text, max_tokens=4,
                                                                               temperature=temperature, seed=seed))))
    return jobs


def hostile_jobs() -> list[tuple[str, dict | bytes, None]]:
    jobs = [(path, body, None) for path, body in HOSTILE]
    jobs += [("/v1/completions", {"model": "t1", "prompt": "good " * 3000}, None),  # over the character limit
             ("/v1/completions", {"model": "t1", "prompt": " ".join(["good"] * 400)}, None),  # over the context
             ("/v1/classify", {"model": "nope", "input": "x"}, None),
             ("/v1/classify", {"model": "t1", "input": "x"}, None),  # not a classification task
             ("/v1/completions", {"model": "t1", "prompt": "x", "max_tokens": 10**30}, None),
             ("/v1/completions", b"{not json", None),
             ("/v1/completions", b"[" * 70000, None),  # over the body limit
             ("/v1/chat/completions", {"model": "t1", "messages": []}, None),
             ("/v1/classify", {"model": "t0", "input": [{"wrong": "x"}]}, None),
             ("/v1/score", {"model": "t0", "input": "x", "continuation": ""}, None)]
    return jobs


def test_chaos_mixed_good_hostile_and_admin(tmp_path, tokenizer):
    model = make_model("llama")
    store = make_store(tmp_path / "store", model, tokenizer)
    broken = break_entries(store)
    before = fingerprint_store(store)
    engine = Engine.from_store(store, model, tokenizer, names=STABLE + CHURN, max_batch_rows=16)
    state = ServerState(engine, Scheduler(engine, max_batch_requests=16, max_wait_ms=10, max_queue=256), store=store,
                        admin_token=TOKEN, max_tokens=16, max_body_bytes=64 * 1024, max_input_chars=2000)
    # what every good request answers alone, before any chaos
    rng = random.Random(0)
    goods = good_jobs(160, rng)
    alone = {i: getattr(engine, kind)([req])[0] for i, (_, _, (kind, req)) in enumerate(goods)}
    jobs = [(p, b, i) for i, (p, b, _) in enumerate(goods)] + [(p, b, None) for p, b, _ in hostile_jobs() * 3]
    rng.shuffle(jobs)

    url, stop = serve(create_app(state))
    t_end = time.monotonic() + DEADLINE_S
    health: list[tuple[int, float]] = []
    admin_log: list[tuple[str, str, int]] = []
    done = threading.Event()

    def probe_health():
        with httpx.Client(timeout=30) as c:
            while not done.is_set() and time.monotonic() < t_end:
                t0 = time.perf_counter()
                health.append((c.get(url + "/health").status_code, time.perf_counter() - t0))
                time.sleep(0.05)

    def operator():
        ops = [("reload", t) for t in STABLE] + [("unload", t) for t in CHURN] + [("load", t) for t in CHURN]
        ops += [("load", b) for b in broken] + [("reload", b) for b in broken[:2]]
        ops += [("load", "../etc"), ("load", "missing")]
        op_rng = random.Random(1)
        with httpx.Client(timeout=60) as c:
            for op, name in [x for _ in range(3) for x in op_rng.sample(ops, len(ops))]:
                if done.is_set() or time.monotonic() > t_end:
                    break
                admin_log.append((op, name, c.post(f"{url}/admin/tasks/{name}/{op}", headers=AUTH).status_code))
            for name in CHURN:  # leave them served
                admin_log.append(("load", name, c.post(f"{url}/admin/tasks/{name}/load", headers=AUTH).status_code))

    def call(job):
        path, body, _ = job
        if time.monotonic() > t_end:
            return None
        if isinstance(body, bytes):
            return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
        return post(url + path, body)

    threads = [threading.Thread(target=probe_health), threading.Thread(target=operator)]
    try:
        for t in threads:
            t.start()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(call, jobs))
        done.set()
        for t in threads:
            t.join(60)
    finally:
        done.set()
        stop()

    assert all(r is not None for r in responses), "the chaos run passed its deadline"
    statuses = [r.status_code for r in responses]
    assert not [s for s in statuses if s >= 500], [(j[0], r.text) for j, r in zip(jobs, responses, strict=True)
                                                   if r.status_code >= 500][:5]
    for (path, body, i), r in zip(jobs, responses, strict=True):
        if i is None:
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            continue
        task = body["model"]
        if task in CHURN and r.status_code == 404:
            continue  # asked while the operator had it unloaded
        assert r.status_code == 200, (path, body, r.text)
        ref, got = alone[i], r.json()
        if path == "/v1/classify":
            assert got["data"][0]["label"] == ref.label
            assert got["data"][0]["probs"] == pytest.approx(ref.probs, abs=1e-5)
        elif path == "/v1/score":
            assert got["logprob"] == pytest.approx(ref.logprob, abs=1e-4)
        else:
            assert got["choices"][0]["text"] == ref.text
    assert sum(1 for i in range(len(goods)) if statuses[[j[2] for j in jobs].index(i)] == 200) >= 100

    assert admin_log and not [x for x in admin_log if x[2] >= 500], admin_log
    for op, name, status in admin_log:
        if name in broken or name in ("missing", "../etc"):
            assert 400 <= status < 500, (op, name, status)
        elif op == "unload":  # a churn task may already be unloaded
            assert status in (200, 404), (op, name, status)
        else:
            assert status == 200, (op, name, status)
    # liveness, not a benchmark: the event loop was never blocked for long
    assert health and all(s == 200 for s, _ in health) and max(t for _, t in health) < 5.0
    assert set(engine.task_names()) == set(STABLE + CHURN)
    assert fingerprint_store(store) == before  # nothing lost, nothing changed
    assert sorted(e.name for e in store.list() if e.kind == "broken") == sorted(broken)

    # the operator's reloads found every entry unchanged, and a reload that read nothing passed them: a reload
    # serves the entry as the store holds it now (t0 replaced by another prompt of 6 virtual tokens, not 2,
    # another template and verbalizer), as a fresh engine on the new entry does
    method = build_method("prompt_tuning", {"num_virtual_tokens": 6, "init": "random", "init_scale": 1.0,
                                            "seed": 77}, model, tokenizer)
    task = {"template": "Classify sentiment : {text} .", "target_field": "label",
            "verbalizer": {"positive": "good", "negative": "bad"}}
    old = engine.classify([ClassifyRequest("t0", w) for w in WORDS])
    store.save("t0", method, model, task=task, overwrite=True)
    new = Engine.from_store(store, model, tokenizer, names=["t0"]).classify([ClassifyRequest("t0", w) for w in WORDS])
    assert any(abs(n.probs["positive"] - o.probs["positive"]) > 1e-3 for n, o in zip(new, old, strict=True))
    with TestClient(create_app(state)) as client:
        r = client.post("/admin/tasks/t0/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["task"]["prompt_tokens"] == [6] and r.json()["task"]["template"] == task["template"]
        got = client.post("/v1/classify", json={"model": "t0", "input": WORDS}).json()["data"]
    assert [d["label"] for d in got] == [n.label for n in new]
    assert [d["probs"] for d in got] == [pytest.approx(n.probs, abs=1e-5) for n in new]
