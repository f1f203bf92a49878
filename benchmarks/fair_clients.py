"""One client's burst and another client's single requests: the fair order between clients vs FIFO.

Client A sends one classify request of ``--burst`` inputs (256, the most one request may carry); while it
waits, client B sends ``--probes`` single-input classify requests, one every ``--gap-ms``. The same requests
run twice on the same scheduler settings, in turn ``--repeats`` times:

- **FIFO**: both clients' requests under one client id, the order the scheduler has for a single client (and
  the order every waiting request had before the fair order existed);
- **fair**: two client ids; the waiting requests are taken round-robin over the clients.

Before any time counts, every answer of both runs is compared with the engine's classification of that input
alone (same label, probabilities within ``--atol``); a mismatch exits 1 with nothing timed. Reported: B's
latency (median and worst, from submission to its answer) and A's time to its whole answer.

    python benchmarks/fair_clients.py                        # the default model, CPU fp32
    python benchmarks/fair_clients.py --model ./my-model --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from softprompt.data.builtin import load_builtin
from softprompt.engine import ClassifyRequest, Engine
from softprompt.methods import build_method
from softprompt.model import DEFAULT_MODEL, load_base_model
from softprompt.server import Scheduler
from softprompt.store import load_prompt, save_prompt

TASK = {"template": "Review: {text}\nSentiment:", "target_field": "label",
        "verbalizer": {"positive": "positive", "negative": "negative"}}


def serve_once(engine, burst: list[str], probes: list[str], gap: float, fair: bool, max_batch_requests: int):
    """A's burst, then B's probes every ``gap`` seconds; (A's results, B's, A's seconds, B's latencies)."""
    sched = Scheduler(engine, max_batch_requests=max_batch_requests, max_wait_ms=5)
    sched.start()
    done: dict[int, float] = {}  # id(job) -> when its answer was set (a dict item set is atomic)

    def stamp(job):
        key = id(job)
        job.future.add_done_callback(lambda _f: done.__setitem__(key, time.perf_counter()))
        return job

    try:
        t0 = time.perf_counter()
        a = [stamp(j) for j in sched.submit_many("classify", [ClassifyRequest("t", x) for x in burst], client="a")]
        sent = []
        for x in probes:
            time.sleep(gap)
            (j,) = sched.submit_many("classify", [ClassifyRequest("t", x)], client="b" if fair else "a")
            sent.append((time.perf_counter(), stamp(j)))
        a_res = [j.future.result(600) for j in a]
        b_res = [j.future.result(600) for _, j in sent]
    finally:
        sched.stop()
    a_seconds = max(done[id(j)] for j in a) - t0
    return a_res, b_res, a_seconds, [done[id(j)] - ts for ts, j in sent]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--burst", type=int, default=256)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--gap-ms", type=float, default=50.0)
    ap.add_argument("--max-batch-requests", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()

    model, tok = load_base_model(args.model, args.device)
    method = build_method("prompt_tuning", {"num_virtual_tokens": 20, "init": "text", "init_text":
                                            "Classify the sentiment of this movie review."}, model, tok)
    texts = [e["text"] for e in load_builtin("rotten_tomatoes")["test"]]
    burst, probes = texts[:args.burst], texts[args.burst:args.burst + args.probes]
    with tempfile.TemporaryDirectory() as d:
        save_prompt(f"{d}/p", method, model, task=TASK)
        engine = Engine(model, tok)
        engine.add_prompt("t", load_prompt(f"{d}/p", model))
    ref = {x: r for x, r in zip(burst + probes, [engine.classify([ClassifyRequest("t", x)])[0]
                                                  for x in burst + probes], strict=True)}
    rows = {"FIFO": [], "fair": []}
    for _ in range(args.repeats):
        for name in rows:
            a_res, b_res, a_s, b_lat = serve_once(engine, burst, probes, args.gap_ms / 1000, name == "fair",
                                                  args.max_batch_requests)
            bad = [x for x, r in zip(burst + probes, a_res + b_res, strict=True)
                   if r.label != ref[x].label or r.probs.keys() != ref[x].probs.keys()
                   or max(abs(r.probs[k] - ref[x].probs[k]) for k in ref[x].probs) > args.atol]
            if bad:
                print(f"{name}: {len(bad)} answers differ from the one-at-a-time reference, e.g. {bad[0][:60]!r}; "
                      "nothing is timed", file=sys.stderr)
                return 1
            rows[name].append((a_s, b_lat))
    print(f"{args.burst}-input burst from client A; {args.probes} single inputs from client B every {args.gap_ms:g} "
          f"ms; --max-batch-requests {args.max_batch_requests}; {args.repeats} repeats (medians); every answer "
          "checked against the engine alone")
    print(f"{'order':6} {'B median s':>11} {'B worst s':>10} {'A whole s':>10}")
    out = {}
    for name, runs in rows.items():
        b_med = statistics.median(statistics.median(b) for _, b in runs)
        b_max = statistics.median(max(b) for _, b in runs)
        a_s = statistics.median(a for a, _ in runs)
        out[name] = (b_med, b_max, a_s)
        print(f"{name:6} {b_med:11.3f} {b_max:10.3f} {a_s:10.3f}")
    print(f"B's median latency: FIFO / fair = {out['FIFO'][0] / out['fair'][0]:.1f}x; A's whole answer: fair / FIFO "
          f"= {out['fair'][2] / out['FIFO'][2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
