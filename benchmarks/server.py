"""Server throughput and latency: 200 concurrent requests over 8 tasks vs the same requests one at a time.

A store of 8 tasks (20-token prompts on the default model; even tasks classify Rotten Tomatoes reviews,
odd ones complete text with 8 new greedy tokens) is served in-process by uvicorn on 127.0.0.1. The same 200
requests are sent (1) one at a time, each waiting for the previous answer, and (2) all at once from
concurrent clients, which the scheduler batches into mixed-task engine calls. Prints requests/s, p50 and
p99 latency of each, and the throughput ratio. Responses of both runs are compared.

With ``--open-loop``, the same store gets an open-loop load instead (Poisson arrivals at several rates, sent
whatever the server's state) under each scheduler policy: see ``benchmarks/open_loop.py``.

    python benchmarks/server.py
    python benchmarks/server.py --requests 200 --max-batch-requests 32 --max-wait-ms 10
    python benchmarks/server.py --open-loop --rates 0.5,1,2,4 --requests-per-rate 60
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import open_loop
import uvicorn
from bench_common import percentile

from softprompt.data.builtin import load_builtin
from softprompt.engine import Engine
from softprompt.methods import build_method
from softprompt.model import DEFAULT_MODEL, load_base_model
from softprompt.server import Scheduler, ServerState, create_app
from softprompt.store import PromptStore

SENT = {"template": "Review: {text}\nSentiment:", "target_field": "label",
        "verbalizer": {"positive": "positive", "negative": "negative"}}
GEN = {"template": "Review: {text}\nIn one word, the film is", "target_field": "word", "verbalizer": None}


def review_texts() -> list[str]:
    """Rotten Tomatoes test reviews cut to 40 words: the inputs of every request."""
    return [" ".join(r["text"].split()[:40]) for r in load_builtin("rotten_tomatoes")["test"]]


def workload(n: int, tasks: int, new_tokens: int) -> list[tuple[str, dict]]:
    texts = review_texts()
    out = []
    for i in range(n):
        task, text = f"task{i % tasks}", texts[i]
        if i % tasks % 2 == 0:
            out.append(("/v1/classify", {"model": task, "input": text}))
        else:
            out.append(("/v1/completions", {"model": task, "prompt": text, "max_tokens": new_tokens,
                                             "temperature": 0}))
    return out


async def one(client: httpx.AsyncClient, path: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = await client.post(path, json=body)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()


async def sequential(url: str, jobs) -> tuple[float, list]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        out = [await one(c, p, b) for p, b in jobs]
        return time.perf_counter() - t0, out


async def concurrent(url: str, jobs) -> tuple[float, list]:
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(c, p, b) for p, b in jobs))
        return time.perf_counter() - t0, list(out)


def answer(res: dict) -> str:
    return res["data"][0]["label"] if "data" in res else res["choices"][0]["text"]


def build_engine(args) -> tuple[object, Engine]:
    """The base model, and an engine over a temporary store of ``args.tasks`` tasks (even ones classify)."""
    model, tok = load_base_model(args.model, args.device, args.dtype)
    with tempfile.TemporaryDirectory() as d:
        store = PromptStore(Path(d) / "store", create=True)
        for t in range(args.tasks):
            method = build_method("prompt_tuning", {"num_virtual_tokens": args.prompt_tokens, "init": "sample_vocab",
                                                    "seed": t}, model, tok)
            store.save(f"task{t}", method, model, task=SENT if t % 2 == 0 else GEN)
        engine = Engine.from_store(store, model, tok, max_batch_rows=args.max_batch_rows)
    return model, engine


def start_server(state: ServerState):
    """Serve ``state`` with uvicorn on a free 127.0.0.1 port in a thread; returns ``(url, stop)``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=60)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags: the closed loop's and the open loop's (``open_loop.add_arguments``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--requests", type=int, default=200, help="closed loop: requests in each run")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=8, help="closed loop: new tokens of each completion")
    ap.add_argument("--max-batch-requests", type=int, default=32, help="requests per scheduler batch")
    ap.add_argument("--max-batch-rows", type=int, default=32, help="rows per engine forward")
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    open_loop.add_arguments(ap)
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.open_loop:
        plan = open_loop.plan_from_args(args, ap)  # every bad flag is reported (exit 2) before the model loads
        model, engine = build_engine(args)
        open_loop.run(plan, args, model, engine, review_texts(), start_server)
        return

    model, engine = build_engine(args)
    state = ServerState(engine, Scheduler(engine, args.max_batch_requests, args.max_wait_ms, max_queue=10_000))
    url, stop = start_server(state)
    jobs = workload(args.requests, args.tasks, args.new_tokens)
    asyncio.run(sequential(url, jobs[: args.tasks]))  # warm-up
    seq_s, seq = asyncio.run(sequential(url, jobs))
    st = state.scheduler.stats
    batches_before, steps_before = st.batches, st.steps
    con_s, con = asyncio.run(concurrent(url, jobs))
    batches, steps = st.batches - batches_before, st.steps - steps_before
    stop()
    differ = [i for i, (a, b) in enumerate(zip(seq, con, strict=True)) if answer(a[1]) != answer(b[1])]
    if differ:  # nothing is timed when the answers disagree
        i = differ[0]
        sys.exit(f"{len(differ)} of {len(jobs)} answers differ between the runs, e.g. request {i}: "
                 f"{answer(seq[i][1])!r} one at a time vs {answer(con[i][1])!r} concurrent")
    n = len(jobs)
    print(f"{n} requests over {args.tasks} tasks ({args.prompt_tokens}-token prompts; half classify, half "
          f"{args.new_tokens}-token completions), {model.device} {model.dtype}, scheduler "
          f"{state.scheduler.policy}, max batch {args.max_batch_requests} requests / {args.max_batch_rows} rows, "
          f"max wait {args.max_wait_ms} ms")
    print(f"{'':14}{'req/s':>10}{'p50 s':>10}{'p99 s':>10}{'wall s':>10}")
    for name, wall, res in (("one at a time", seq_s, seq), ("concurrent", con_s, con)):
        lat = [r[0] for r in res]
        print(f"{name:14}{n / wall:>10.2f}{statistics.median(lat):>10.3f}{percentile(lat, 0.99):>10.3f}{wall:>10.1f}")
    print(f"throughput ratio concurrent/one-at-a-time: {seq_s / con_s:.2f}x  (concurrent run: {batches} "
          f"batches, {steps} decode steps of the running batch; identical answers: {n}/{n})")


if __name__ == "__main__":
    main()
