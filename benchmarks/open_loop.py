"""Open-loop load for ``benchmarks/server.py --open-loop``: Poisson arrivals at several rates, per scheduler policy.

Requests arrive at their scheduled times whatever the server's state (open loop: no request waits for an
earlier answer), with exponential inter-arrival times from a seeded RNG. The mix over the benchmark's tasks
(even tasks classify, odd ones generate): short generations (``--short-tokens``), long generations (a
uniform draw from ``--long-tokens``) and classifications, in the exact proportions of ``--mix``; all greedy.
Generations are streamed, so the time to first token (TTFT) is read at the first chunk with text.

Every rate sends the same requests on the same schedule (one draw of unit-rate arrival times, divided by
the rate), and every policy gets exactly that schedule; rates run from low to high, the policies one after
the other at each rate (in turn first). Latency counts from a request's scheduled arrival, so a late send
is charged to the run (the largest send lag is printed).

Before anything is reported, every answer of every run must equal a reference computed by running each
request alone on the engine; otherwise the benchmark names the requests that differ and exits 1 without
printing a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from bench_common import percentile

from softprompt.engine import ClassifyRequest, GenerateRequest
from softprompt.server import Scheduler, ServerState

POLICIES = ("batch", "continuous")
KINDS = ("short", "long", "classify")
NAMES = {"short": "short gen", "long": "long gen", "classify": "classify"}
DOCS = Path(__file__).resolve().parents[1] / "docs"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The open-loop flags (ignored without ``--open-loop``)."""
    g = ap.add_argument_group("open-loop load", "Poisson arrivals at each rate, under each scheduler policy")
    g.add_argument("--open-loop", action="store_true", help="run the open-loop load instead of the closed loop")
    g.add_argument("--rates", default="0.5,1,2,4", help="offered loads, requests/s (default: %(default)s)")
    g.add_argument("--requests-per-rate", type=int, default=60, help="requests sent at each rate (default: 60)")
    g.add_argument("--seconds-per-rate", type=float, help="instead: the requests that arrive in this many seconds")
    g.add_argument("--mix", default="0.7,0.1,0.2",
                   help="fractions of short generations, long generations, classifications (default: %(default)s)")
    g.add_argument("--short-tokens", type=int, default=4, help="new tokens of a short generation (default: 4)")
    g.add_argument("--long-tokens", default="128,240", help="MIN,MAX new tokens of a long one (default: %(default)s)")
    g.add_argument("--policies", default="batch,continuous", help="scheduler policies (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seeds the arrival times and the request mix")
    g.add_argument("--chart", default=str(DOCS / "server_open_loop.png"), help="PNG of short-request latency")
    g.add_argument("--json", help="also write every run's numbers here")


def available_policies() -> tuple[str, ...]:
    """Both policies once ``Scheduler`` takes ``policy`` (issue 14); before that only batch-at-a-time."""
    return POLICIES if "policy" in inspect.signature(Scheduler).parameters else ("batch",)


def make_scheduler(engine, policy: str, max_batch_requests: int, max_wait_ms: float, max_queue: int) -> Scheduler:
    """A scheduler running ``policy``; a ``Scheduler`` without the parameter only runs ``"batch"``.

    Raises:
        ValueError: ``policy`` is not one this ``Scheduler`` runs.
    """
    if policy not in available_policies():
        raise ValueError(f"scheduler policy {policy!r}: this Scheduler takes no 'policy' (it runs batch-at-a-time "
                         f"only; continuous batching is issue 14); run --policies batch"
                         if policy in POLICIES else f"unknown scheduler policy {policy!r} (one of {POLICIES})")
    if "policy" in inspect.signature(Scheduler).parameters:
        return Scheduler(engine, max_batch_requests, max_wait_ms, max_queue=max_queue, policy=policy)
    return Scheduler(engine, max_batch_requests, max_wait_ms, max_queue=max_queue)


@dataclass(frozen=True)
class Plan:
    """What to send: the rates, how many requests at each, and when (at 1 request/s)."""

    rates: list[float]
    counts: list[int]  # requests sent at each rate: the first ones of the request list
    unit: list[float]  # arrival times at 1 request/s (the first at 0); at rate r they are divided by r
    policies: list[str]
    mix: tuple[float, float, float]
    short_tokens: int
    long_tokens: tuple[int, int]
    seed: int


def _numbers(text: str, kind, flag: str, problems: list[str]) -> list:
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        problems.append(f"{flag} {text!r}: expected comma-separated numbers")
        return []


def plan_from_args(args, ap: argparse.ArgumentParser) -> Plan:
    """Validate the open-loop flags (every problem at once, exit 2) and draw the arrival times."""
    problems: list[str] = []
    rates = _numbers(args.rates, float, "--rates", problems)
    if rates and not all(r > 0 for r in rates):
        problems.append(f"--rates {args.rates!r}: every rate must be > 0 requests/s")
    mix = _numbers(args.mix, float, "--mix", problems)
    if mix and (len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1) > 1e-6):
        problems.append(f"--mix {args.mix!r}: three fractions >= 0 (short, long, classify) summing to 1")
    long_tokens = _numbers(args.long_tokens, int, "--long-tokens", problems)
    if long_tokens and (len(long_tokens) != 2 or not 1 <= long_tokens[0] <= long_tokens[1]):
        problems.append(f"--long-tokens {args.long_tokens!r}: MIN,MAX with 1 <= MIN <= MAX")
    if args.short_tokens < 1:
        problems.append(f"--short-tokens {args.short_tokens}: must be >= 1")
    if args.seconds_per_rate is None and args.requests_per_rate < 1:
        problems.append(f"--requests-per-rate {args.requests_per_rate}: must be >= 1")
    if args.seconds_per_rate is not None and args.seconds_per_rate <= 0:
        problems.append(f"--seconds-per-rate {args.seconds_per_rate}: must be > 0")
    policies = args.policies.split(",")
    for p in policies:
        if p not in available_policies():
            problems.append(f"--policies: {p!r} is not a policy this Scheduler runs ({', '.join(available_policies())})"
                            + ("; continuous batching (issue 14) is not in this branch yet" if p in POLICIES else ""))
    if len(set(policies)) != len(policies):
        problems.append(f"--policies {args.policies!r}: a policy is named twice")
    if args.tasks < 2:
        problems.append(f"--tasks {args.tasks}: the open loop needs >= 2 (even tasks classify, odd ones generate)")
    if problems:
        ap.error("; ".join(problems))
    rng = random.Random(f"{args.seed}-arrivals")
    if args.seconds_per_rate is None:
        total = args.requests_per_rate
    else:  # enough unit-rate arrivals to fill the window at the highest rate
        total, t = 1, 0.0
        while t < args.seconds_per_rate * max(rates):
            t += rng.expovariate(1.0)
            total += 1
        rng = random.Random(f"{args.seed}-arrivals")
    unit = [0.0]
    for _ in range(total - 1):
        unit.append(unit[-1] + rng.expovariate(1.0))
    if args.seconds_per_rate is None:
        counts = [total] * len(rates)
    else:
        counts = [max(1, sum(u < args.seconds_per_rate * r for u in unit)) for r in rates]
    return Plan(sorted(rates), [c for _, c in sorted(zip(rates, counts, strict=True))], unit, policies,
                (mix[0], mix[1], mix[2]), args.short_tokens, (long_tokens[0], long_tokens[1]), args.seed)


@dataclass(frozen=True)
class Req:
    """One request of the load: its kind (short, long, classify), task, input and new tokens (0: classify)."""

    index: int
    kind: str
    task: str
    text: str
    max_tokens: int


def build_requests(plan: Plan, n: int, texts: list[str], tasks: int) -> list[Req]:
    """``n`` requests, kinds in the exact proportions of the mix (largest remainders), in a seeded order."""
    rng = random.Random(f"{plan.seed}-requests")
    exact = [f * n for f in plan.mix]
    counts = [int(x) for x in exact]
    for k in sorted(range(3), key=lambda k: counts[k] - exact[k])[: n - sum(counts)]:
        counts[k] += 1
    kinds = [k for k, c in zip(KINDS, counts, strict=True) for _ in range(c)]
    rng.shuffle(kinds)
    classify_tasks, generate_tasks = list(range(0, tasks, 2)), list(range(1, tasks, 2))
    out = []
    for i, kind in enumerate(kinds):
        if kind == "classify":
            out.append(Req(i, kind, f"task{classify_tasks[i % len(classify_tasks)]}", texts[i % len(texts)], 0))
        else:
            new = plan.short_tokens if kind == "short" else rng.randint(*plan.long_tokens)
            out.append(Req(i, kind, f"task{generate_tasks[i % len(generate_tasks)]}", texts[i % len(texts)], new))
    return out


@dataclass(frozen=True)
class Answer:
    """The reference answer of a request run alone: its label or text, and how many tokens it generated."""

    answer: str
    tokens: int


def reference(engine, reqs: list[Req]) -> list[Answer]:
    """Each request alone on the engine (a batch of one), as the server would build it."""
    out = []
    for r in reqs:
        if r.kind == "classify":
            (res,) = engine.classify([ClassifyRequest(r.task, r.text)])
            out.append(Answer(res.label, 0))
        else:
            (res,) = engine.generate([GenerateRequest(r.task, r.text, max_tokens=r.max_tokens, temperature=0)])
            out.append(Answer(res.text, len(res.tokens)))
    return out


@dataclass
class Outcome:
    """What the client saw: seconds from the scheduled arrival to the end and to the first text, the answer."""

    lag: float  # how late the request was sent
    latency: float | None = None
    ttft: float | None = None
    answer: str | None = None
    error: str | None = None


async def send(client: httpx.AsyncClient, req: Req, at: float) -> Outcome:
    """Send ``req`` at ``at`` (perf_counter seconds) and read its answer; a generation is streamed."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    out = Outcome(lag=time.perf_counter() - at)
    try:
        if req.kind == "classify":
            r = await client.post("/v1/classify", json={"model": req.task, "input": req.text})
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {r.text[:300]}"
                return out
            out.answer, out.latency = r.json()["data"][0]["label"], time.perf_counter() - at
            return out
        body = {"model": req.task, "prompt": req.text, "max_tokens": req.max_tokens, "temperature": 0, "stream": True}
        parts, finished = [], False
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    finished = True
                    break
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    out.error = f"error in the stream: {chunk['error'].get('message')}"
                    return out
                text = chunk["choices"][0]["text"]
                if text and out.ttft is None:
                    out.ttft = time.perf_counter() - at
                parts.append(text)
        if not finished:
            out.error = "the stream ended without [DONE]"
            return out
        out.answer, out.latency = "".join(parts), time.perf_counter() - at
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    return out


async def run_load(url: str, reqs: list[Req], arrivals: list[float]) -> tuple[list[Outcome], float]:
    """Send every request at its arrival time (seconds from the start) at once; returns outcomes and the
    seconds from the first arrival to the last answer."""
    # no connection limit: a pool that makes a request wait for a free connection would close the loop
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits) as client:
        t0 = time.perf_counter() + 0.05
        outs = await asyncio.gather(*(send(client, r, t0 + a) for r, a in zip(reqs, arrivals, strict=True)))
    end = max((a + o.latency for a, o in zip(arrivals, outs, strict=True) if o.latency is not None), default=0.0)
    return list(outs), end


def _excerpt(want: str, got: str) -> str:
    """Where two answers part: a few characters either side of the first difference."""
    i = next((k for k, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
    lo = max(0, i - 20)
    return f"expected {want[lo:i + 30]!r}, got {got[lo:i + 30]!r} (first difference at character {i})"


def mismatches(reqs: list[Req], refs: list[Answer], runs: dict) -> list[str]:
    """One line per request whose answer in a run is an error or differs from its reference."""
    bad = []
    for (rate, policy), (outs, _) in runs.items():
        for r, ref, o in zip(reqs, refs, outs, strict=False):
            where = f"request {r.index} ({NAMES[r.kind]}, {r.task}) at {rate:g} req/s under policy {policy}"
            if o.error is not None:
                bad.append(f"{where}: {o.error}")
            elif o.answer != ref.answer:
                bad.append(f"{where}: {_excerpt(ref.answer, o.answer)}")
    return bad


def _q(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def summarize(rate: float, policy: str, reqs: list[Req], refs: list[Answer], outs: list[Outcome], span: float) -> dict:
    """Throughput, TTFT and per-kind latency quantiles of one run."""
    n = len(outs)
    s = {"rate": rate, "policy": policy, "requests": n, "seconds": span, "req_per_s": n / span,
         "tok_per_s": sum(ref.tokens for ref in refs[:n]) / span, "max_lag_s": max(o.lag for o in outs)}
    ttft = [o.ttft for r, o in zip(reqs, outs, strict=False) if r.kind != "classify" and o.ttft is not None]
    s["ttft_p50"], s["ttft_p99"] = _q(ttft, 0.5), _q(ttft, 0.99)
    for kind in KINDS:
        lat = [o.latency for r, o in zip(reqs, outs, strict=False) if r.kind == kind]
        s[f"{kind}_n"], s[f"{kind}_p50"], s[f"{kind}_p99"] = len(lat), _q(lat, 0.5), _q(lat, 0.99)
    return s


def _f(v: float | None, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def print_tables(summaries: list[dict], policies: list[str]) -> None:
    """The per-run table, then the batch/continuous ratio of short-request latency at each rate."""
    cols = ["rate", "policy", "req/s", "tok/s", "TTFT p50", "TTFT p99", "short p50", "short p99", "long p50",
            "long p99", "cls p50", "cls p99", "wall s", "lag max"]
    print("latencies in seconds from the scheduled arrival; TTFT of generations (first streamed text)")
    print(f"{cols[0]:>6}  {cols[1]:<11}" + "".join(f"{c:>11}" for c in cols[2:]))
    for s in summaries:
        print(f"{s['rate']:>6g}  {s['policy']:<11}{_f(s['req_per_s'], 11)}{_f(s['tok_per_s'], 11, 1)}"
              + "".join(_f(s[k], 11, 3) for k in ("ttft_p50", "ttft_p99", "short_p50", "short_p99", "long_p50",
                                                "long_p99", "classify_p50", "classify_p99"))
              + f"{_f(s['seconds'], 11, 1)}{_f(s['max_lag_s'], 11, 3)}")
    if not {"batch", "continuous"} <= set(policies):
        print("short-request latency ratio batch/continuous: needs both policies (--policies batch,continuous)")
        return
    by = {(s["rate"], s["policy"]): s for s in summaries}
    print("short-request latency, batch / continuous:")
    print(f"{'rate':>6}{'p99 batch':>12}{'p99 cont':>12}{'p99 ratio':>12}{'p50 ratio':>12}")
    for rate in sorted({s["rate"] for s in summaries}):
        b, c = by[(rate, "batch")], by[(rate, "continuous")]
        ratios = ["-" if not (b[f"short_{q}"] and c[f"short_{q}"]) else f"{b[f'short_{q}'] / c[f'short_{q}']:.2f}x"
                  for q in ("p99", "p50")]
        print(f"{rate:>6g}{_f(b['short_p99'], 12, 3)}{_f(c['short_p99'], 12, 3)}{ratios[0]:>12}{ratios[1]:>12}")


def plot(summaries: list[dict], policies: list[str], out_png: str | Path, title: str) -> Path:
    """PNG of short-request p99 (solid) and p50 (dashed) latency against offered load, one colour per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in policies:
        k = POLICIES.index(policy)  # one colour per policy, whichever runs
        rows = sorted((s for s in summaries if s["policy"] == policy and s["short_p99"] is not None),
                      key=lambda s: s["rate"])
        x = [s["rate"] for s in rows]
        ax.plot(x, [s["short_p99"] for s in rows], "o-", color=f"C{k}", label=f"{policy}: p99")
        ax.plot(x, [s["short_p50"] for s in rows], "s--", color=f"C{k}", alpha=0.6, label=f"{policy}: p50")
    rates = sorted({s["rate"] for s in summaries})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("offered load (requests/s, Poisson arrivals)")
    ax.set_ylabel("short-request latency (s)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def _note(msg: str) -> None:
    print(f"[open loop] {msg}", file=sys.stderr, flush=True)


def run(plan: Plan, args, model, engine, texts: list[str], start_server) -> None:
    """Reference, warm-up, then every rate under every policy; check every answer, then report (or exit 1)."""
    reqs = build_requests(plan, max(plan.counts), texts, args.tasks)
    _note(f"reference: {len(reqs)} requests, each alone on the engine")
    refs = reference(engine, reqs)
    servers = {}
    try:
        for policy in plan.policies:
            sched = make_scheduler(engine, policy, args.max_batch_requests, args.max_wait_ms, max_queue=100_000)
            servers[policy] = start_server(ServerState(engine, sched, max_tokens=max(512, plan.long_tokens[1])))
        firsts = [next(r for r in reqs if r.kind == k) for k in KINDS if any(r.kind == k for r in reqs)]
        for url, _ in servers.values():  # warm-up: one request of each kind through each server, untimed
            asyncio.run(run_load(url, firsts, [0.0] * len(firsts)))
        runs: dict = {}
        for i, (rate, n) in enumerate(zip(plan.rates, plan.counts, strict=True)):
            order = plan.policies if i % 2 == 0 else plan.policies[::-1]
            for policy in order:
                _note(f"{rate:g} req/s, policy {policy}: {n} requests")
                runs[(rate, policy)] = asyncio.run(run_load(servers[policy][0], reqs[:n],
                                                            [u / rate for u in plan.unit[:n]]))
    finally:
        for _, stop in servers.values():
            stop()
    bad = mismatches(reqs, refs, runs)
    if bad:
        print(f"{len(bad)} answers are not the one-request-at-a-time reference; no timings are reported:",
              file=sys.stderr)
        for line in bad[:30]:
            print(f"  {line}", file=sys.stderr)
        if len(bad) > 30:
            print(f"  ... and {len(bad) - 30} more", file=sys.stderr)
        sys.exit(1)

    counts = {k: sum(r.kind == k for r in reqs) for k in KINDS}
    print(f"open loop: {'/'.join(map(str, plan.counts))} requests at {'/'.join(f'{r:g}' for r in plan.rates)} "
          f"req/s (Poisson, seed {plan.seed}) over {args.tasks} tasks ({args.prompt_tokens}-token prompts), "
          f"{model.device} {model.dtype}, max batch {args.max_batch_requests} requests / {args.max_batch_rows} "
          f"rows, max wait {args.max_wait_ms} ms")
    print(f"mix of the {len(reqs)} requests: {counts['short']} short generations ({plan.short_tokens} tokens), "
          f"{counts['long']} long ({plan.long_tokens[0]}-{plan.long_tokens[1]} tokens, "
          f"{sum(a.tokens for r, a in zip(reqs, refs, strict=True) if r.kind == 'long')} in all), "
          f"{counts['classify']} classifications; greedy, generations streamed")
    print(f"checked: all {sum(len(o) for o, _ in runs.values())} answers of {len(runs)} runs equal the "
          f"one-request-at-a-time reference")
    summaries = [summarize(rate, policy, reqs, refs, *runs[(rate, policy)])
                 for rate in plan.rates for policy in plan.policies]
    print_tables(summaries, plan.policies)
    title = (f"{Path(args.model).name}, {model.device} {model.dtype}; {counts['short']} short ({plan.short_tokens}"
             f"-token) generations among {len(reqs)} requests")
    print(f"chart: {plot(summaries, plan.policies, args.chart, title)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": asdict(plan), "summaries": summaries}, indent=1))
        print(f"numbers: {args.json}")
