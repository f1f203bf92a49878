"""A short request sent while a long generation runs: how long it waits, continuous vs batch-at-a-time.

The store of ``benchmarks/server.py`` (8 tasks, 20-token prompts on the default model) is served in-process
over HTTP. For each scheduling policy, a long greedy generation (``--long-tokens`` new tokens, streamed) is
started; once it has streamed ``--after`` tokens, a short request (``--short-tokens`` new tokens, another
task) is sent and its latency measured, ``--repeats`` times. Both answers are first checked against the
same requests run alone (a mismatch exits 1 before any time is printed); a long generation that fails, or
that ends before the short request was sent (the short one would have run alone), exits 1 as well, and
``--after`` must be below ``--long-tokens`` (exit 2 otherwise). Under batch-at-a-time the short request
waits for the whole long generation; under continuous batching it joins the running batch at the next
decode step. The ratio printed is batch / continuous, whatever the order of ``--policies``.

    python benchmarks/join_latency.py
    python benchmarks/join_latency.py --long-tokens 240 --short-tokens 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server import build_engine, review_texts, start_server  # noqa: E402

from softprompt.engine import GenerateRequest  # noqa: E402
from softprompt.model import DEFAULT_MODEL  # noqa: E402
from softprompt.server import Scheduler, ServerState  # noqa: E402
from softprompt.server.scheduler import POLICIES  # noqa: E402


def long_input(engine, task: str, tokens: int, texts: list[str]) -> str:
    """An input whose greedy continuation runs the full ``tokens`` (no early EOS)."""
    for text in texts[:40]:
        if engine.generate([GenerateRequest(task, text, max_tokens=tokens)])[0].finish_reason == "length":
            return text
    raise SystemExit(f"no input among the first 40 runs {tokens} tokens without EOS on {task}")


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=60).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
            if k.startswith("softprompt_kv_slot") or k == "softprompt_running_generations"}


def race(url: str, long_body: dict, short_body: dict, after: int) -> tuple[float, float, str, str, dict]:
    """Short-request latency, long-request total time, both texts, and the slot gauges while both ran.

    Exits 1 when the long generation fails, or ends before ``after`` chunks (the short request would run alone).
    """
    started, out = threading.Event(), {}

    def run_long() -> None:
        t0, text, n = time.perf_counter(), "", 0
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**long_body, "stream": True},
                              timeout=600) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])["choices"][0]
                    text += chunk["text"]
                    n += 1
                    if n >= after:
                        started.set()
            out["long"] = (time.perf_counter() - t0, text, n)
        except Exception as e:  # noqa: BLE001 - reported by the main thread, which must not wait for it
            out["error"] = f"{type(e).__name__}: {e}"
        finally:
            started.set()  # the main thread goes on whatever happened here

    thread = threading.Thread(target=run_long)
    thread.start()
    started.wait(600)
    if "error" in out or "long" in out:
        thread.join()
        fail(f"the long generation failed: {out['error']}" if "error" in out else
             f"the long generation ended after {out['long'][2]} chunks, before the short request was sent (after "
             f"{after}): the short one would run alone; lower --after")
    t0 = time.perf_counter()
    try:
        r = httpx.post(url + "/v1/completions", json=short_body, timeout=600)
        r.raise_for_status()
    except httpx.HTTPError as e:
        thread.join()
        fail(f"the short request failed: {type(e).__name__}: {e}")
    short = time.perf_counter() - t0
    short_text = r.json()["choices"][0]["text"]
    memory = gauges(url)  # the long generation is still running (it has over 200 tokens to go)
    thread.join()
    if "error" in out:
        fail(f"the long generation failed: {out['error']}")
    return short, out["long"][0], short_text, out["long"][1], memory


def fail(message: str) -> None:
    """Stop with exit status 1 and no timings."""
    print(f"join_latency: {message}; no timings are reported", file=sys.stderr)
    sys.exit(1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--max-batch-rows", type=int, default=32)
    ap.add_argument("--long-tokens", type=int, default=240)
    ap.add_argument("--short-tokens", type=int, default=4)
    ap.add_argument("--after", type=int, default=10, help="send the short request after this many long chunks")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default="batch,continuous")
    args = ap.parse_args(argv)
    policies = args.policies.split(",")
    problems = []
    if any(p not in POLICIES for p in policies) or len(set(policies)) != len(policies):
        problems.append(f"--policies {args.policies!r}: each one of {', '.join(POLICIES)}, once")
    if not 1 <= args.after < args.long_tokens:
        problems.append(f"--after {args.after}: the short request is sent after this many chunks of the long "
                        f"generation, so it must be at least 1 and below --long-tokens {args.long_tokens} (else the "
                        "long one has ended and the short one runs alone)")
    if problems:
        ap.error("; ".join(problems))
    _, engine = build_engine(args)
    texts = review_texts()
    long_text = long_input(engine, "task1", args.long_tokens, texts)
    long_body = {"model": "task1", "prompt": long_text, "max_tokens": args.long_tokens, "temperature": 0}
    short_body = {"model": "task3", "prompt": texts[-1], "max_tokens": args.short_tokens, "temperature": 0}
    want_long = engine.generate([GenerateRequest("task1", long_text, max_tokens=args.long_tokens)])[0].text
    want_short = engine.generate([GenerateRequest("task3", texts[-1], max_tokens=args.short_tokens)])[0].text
    rows, memory_line = {}, None
    for policy in policies:
        state = ServerState(engine, Scheduler(engine, max_wait_ms=5, policy=policy), max_tokens=args.long_tokens)
        url, stop = start_server(state)
        try:
            runs = [race(url, long_body, short_body, args.after) for _ in range(args.repeats)]
        finally:
            stop()
        for _, _, s_text, l_text, _ in runs:
            if (s_text, l_text) != (want_short, want_long):
                raise SystemExit(f"{policy}: an answer differs from the request run alone: "
                                 f"{(s_text, l_text[:60])!r} vs {(want_short, want_long[:60])!r}")
        rows[policy] = (statistics.median(r[0] for r in runs), max(r[0] for r in runs),
                        statistics.median(r[1] for r in runs))
        mem = runs[-1][4]
        if policy == "continuous" and mem.get("softprompt_running_generations"):
            n, b, t = (mem["softprompt_running_generations"], mem["softprompt_kv_slot_bytes"],
                       mem["softprompt_kv_slot_tokens"])
            memory_line = (f"key/value slots while the long one ran: {n:.0f} row(s), {t:.0f} tokens, {b / 2**20:.1f} "
                           f"MiB allocated ({b / n / 2**20:.1f} MiB per running row, {b / max(t, 1) / 1024:.0f} KiB "
                           f"per token held; prompts shared, not counted)")
    print(f"long: {args.long_tokens} tokens streamed; short: {args.short_tokens} tokens sent after {args.after} "
          f"long chunks; {args.repeats} repeats; answers equal the requests run alone")
    print(f"{'policy':<12} {'short p50 s':>12} {'short max s':>12} {'long s':>8}")
    for policy, (p50, worst, long_s) in rows.items():
        print(f"{policy:<12} {p50:>12.2f} {worst:>12.2f} {long_s:>8.2f}")
    if "batch" in rows and "continuous" in rows:
        print(f"short-request latency, batch / continuous: {rows['batch'][0] / rows['continuous'][0]:.1f}x")
    if memory_line:
        print(memory_line)


if __name__ == "__main__":
    main()
