"""The benchmark scripts run end to end on a tiny model (a smoke test: no timing is asserted)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_runs_on_tiny_model(tiny_model_dir, monkeypatch):
    pytest.importorskip("peft")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--model", str(tiny_model_dir),
                           "--steps", "2", "--warmup", "1", "--batch-size", "4", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "throughput ratio softprompt/peft" in out and "memory ratio softprompt/peft" in out
    assert "median per-batch step-time ratio peft/softprompt" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("same-prompt loss"))
    diff = float(line.split("|diff| ")[1].rstrip(")"))
    assert diff < 1e-4  # both sides compute the same loss from the same prompt


def test_engine_benchmark_runs_on_tiny_model(tiny_model_dir):
    pytest.importorskip("peft")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "engine.py"), "--model", str(tiny_model_dir),
                           "--tasks", "3", "--requests", "5", "--prompt-tokens", "4", "--batch-size", "4",
                           "--new-tokens", "6", "--repeats", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # every side equals the one-request-at-a-time reference before anything is timed
    assert ("label agreement with the reference: softprompt 1.0000, peft strongest 1.0000, peft default 1.0000"
            in out)
    assert "throughput ratio softprompt / peft strongest" in out
    lines = {ln.strip().split("  ")[0]: ln for ln in out.splitlines() if "ms/token" in ln or "WRONG" in ln}
    assert "ms/token" in lines["softprompt, cached prompt"]  # our decode equals the uncached reference
    assert "ms/token" in lines["peft prompt + HF generate(inputs_embeds)"]
    assert len(lines) == 5  # each side is either timed or reported wrong


def test_server_benchmark_runs_on_tiny_model(tiny_model_dir):
    pytest.importorskip("fastapi")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "server.py"), "--model", str(tiny_model_dir),
                           "--requests", "24", "--tasks", "4", "--prompt-tokens", "3", "--new-tokens", "2",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "throughput ratio concurrent/one-at-a-time" in proc.stdout
    assert "identical answers: 24/24" in proc.stdout


def bench(monkeypatch, name: str):
    """A module of benchmarks/, imported as its scripts import each other."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def wordy_model_dir(tmp_path_factory):
    """A tiny llama whose greedy continuations of the benchmark's inputs decode to words (those of
    ``tiny_model_dir`` are ids the test tokenizer has no word for, so every generated text would be empty)."""
    from tests.conftest import make_model, make_tokenizer

    d = tmp_path_factory.mktemp("wordy-llama")
    make_model("llama", seed=5).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


OPEN_LOOP = ["--open-loop", "--tasks", "4", "--prompt-tokens", "3", "--rates", "20,40", "--requests-per-rate", "6",
             "--mix", "0.5,0.17,0.33", "--long-tokens", "6,8", "--policies", "batch,continuous", "--device", "cpu"]


def test_server_open_loop_benchmark_runs_on_tiny_model(wordy_model_dir, tmp_path):
    pytest.importorskip("fastapi")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    chart, numbers = tmp_path / "images" / "open_loop.png", tmp_path / "open_loop.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "server.py"), "--model", str(wordy_model_dir),
                           *OPEN_LOOP, "--chart", str(chart), "--json", str(numbers)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    # 3 short generations, 1 long, 2 classifications, each sent at both rates, all checked before any timing
    assert any(ln.startswith("mix of the 6 requests: 3 short generations (4 tokens), 1 long (6-8 tokens") for ln in out)
    assert "checked: all 24 answers of 4 runs equal the one-request-at-a-time reference" in out
    head = next(i for i, ln in enumerate(out) if ln.split()[:2] == ["rate", "policy"])
    assert out[head].split()[2:] == ["req/s", "tok/s", "TTFT", "p50", "TTFT", "p99", "short", "p50", "short", "p99",
                                     "long", "p50", "long", "p99", "cls", "p50", "cls", "p99", "wall", "s", "lag",
                                     "max"]
    rows = [ln.split() for ln in out[head + 1:head + 5]]
    assert sorted(r[:2] for r in rows) == [["20", "batch"], ["20", "continuous"], ["40", "batch"],
                                           ["40", "continuous"]] and all(len(r) == 14 for r in rows)
    assert all(float(r[i]) > 0 for r in rows for i in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11))  # every kind timed, TTFT too
    assert "short-request latency, batch / continuous:" in proc.stdout
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads(numbers.read_text())["summaries"]
    keys = ("rate", "policy", "requests", "short_n", "long_n", "classify_n")
    assert sorted(tuple(r[k] for k in keys) for r in runs) == [
        (20.0, "batch", 6, 3, 1, 2), (20.0, "continuous", 6, 3, 1, 2), (40.0, "batch", 6, 3, 1, 2),
        (40.0, "continuous", 6, 3, 1, 2)]


def test_server_open_loop_benchmark_refuses_to_time_answers_that_differ(wordy_model_dir, tmp_path, monkeypatch,
                                                                        capsys):
    pytest.importorskip("fastapi")
    server, open_loop = bench(monkeypatch, "server"), bench(monkeypatch, "open_loop")
    real = open_loop.reference

    def planted(engine, reqs):  # request 1's reference answer is not what the server will say
        refs = real(engine, reqs)
        refs[1] = open_loop.Answer(refs[1].answer + " planted", refs[1].tokens)
        return refs

    monkeypatch.setattr(open_loop, "reference", planted)
    chart = tmp_path / "open_loop.png"
    with pytest.raises(SystemExit) as stop:
        server.main(["--model", str(wordy_model_dir), *OPEN_LOOP, "--chart", str(chart)])
    assert stop.value.code == 1
    out = capsys.readouterr()
    kind = {"short": "short gen", "long": "long gen", "classify": "classify"}
    plan = open_loop.plan_from_args(server.build_parser().parse_args(OPEN_LOOP), server.build_parser())
    req = open_loop.build_requests(plan, 6, server.review_texts(), 4)[1]
    for rate in ("20", "40"):  # named at each rate and policy it was sent under, and nothing is timed
        for policy in ("batch", "continuous"):
            named = f"request 1 ({kind[req.kind]}, {req.task}) at {rate} req/s under policy {policy}: expected"
            assert named in out.err
    assert "4 answers are not the one-request-at-a-time reference; no timings are reported" in out.err
    assert "req/s" not in out.out and "checked" not in out.out and not chart.exists()


def test_open_loop_sends_on_schedule_whatever_the_server(monkeypatch):
    """Open loop: a request goes out at its arrival time even while every earlier one is still unanswered."""
    import asyncio

    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from tests.conftest import serve

    open_loop = bench(monkeypatch, "open_loop")
    app, slow = FastAPI(), 0.5

    @app.post("/v1/completions")
    async def completions():
        async def events():
            await asyncio.sleep(slow)
            yield 'data: {"choices": [{"text": "late"}]}\n\n'
            yield 'data: {"choices": [{"text": " words"}]}\n\ndata: [DONE]\n\n'
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/classify")
    async def classify():
        await asyncio.sleep(slow)
        return {"data": [{"label": "positive"}]}

    url, stop = serve(app)
    try:
        reqs = [open_loop.Req(i, "classify" if i % 3 == 2 else "short", "t", "x", 0 if i % 3 == 2 else 4)
                for i in range(6)]
        arrivals = [0.05 * i for i in range(6)]
        outs, span = asyncio.run(open_loop.run_load(url, reqs, arrivals))
    finally:
        stop()
    assert [o.answer for o in outs] == ["late words", "late words", "positive"] * 2 and not any(o.error for o in outs)
    assert max(o.lag for o in outs) < slow / 2  # sent on time, not after the previous answer
    assert all(o.ttft >= slow for o in outs if o.ttft is not None)
    assert all(slow <= o.latency < 2 * slow for o in outs)  # no request waits for another (a connection, an answer)
    assert span < 0.25 + 2 * slow  # waiting for each answer would take 6 x 0.5 s


def test_open_loop_schedule_mix_and_policies(monkeypatch, capsys):
    server, open_loop = bench(monkeypatch, "server"), bench(monkeypatch, "open_loop")
    ap = server.build_parser()
    flags = ["--open-loop", "--policies", "batch", "--requests-per-rate", "2000", "--rates", "4,0.5"]
    plan = open_loop.plan_from_args(ap.parse_args(flags), ap)
    assert plan == open_loop.plan_from_args(ap.parse_args(flags), ap)  # seeded
    gaps = [b - a for a, b in zip(plan.unit, plan.unit[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    sd = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert plan.unit[0] == 0 and min(gaps) > 0 and abs(mean - 1) < 0.1 and abs(sd - 1) < 0.15  # exponential, rate 1
    assert plan.rates == [0.5, 4.0] and plan.counts == [2000, 2000]
    reqs = open_loop.build_requests(plan, 60, [f"text {i}" for i in range(100)], 8)
    assert [sum(r.kind == k for r in reqs) for k in open_loop.KINDS] == [42, 6, 12]  # exactly 0.7/0.1/0.2
    assert all(128 <= r.max_tokens <= 240 for r in reqs if r.kind == "long")
    assert all((int(r.task[4:]) % 2 == 0) == (r.kind == "classify") for r in reqs)
    timed = open_loop.plan_from_args(ap.parse_args([*flags[:3], "--seconds-per-rate", "10", "--rates", "1,2"]), ap)
    assert timed.counts == [sum(u < 10 for u in timed.unit), sum(u < 20 for u in timed.unit)]
    with pytest.raises(SystemExit) as bad:
        open_loop.plan_from_args(ap.parse_args([*flags[:3], "--rates", "0", "--mix", "0.5,0.6,0"]), ap)
    assert bad.value.code == 2
    err = capsys.readouterr().err
    assert "--rates '0': every rate must be > 0" in err and "--mix '0.5,0.6,0': three fractions" in err  # both at once

    class Fake:  # the scheduler once it takes a policy (issue 14)
        def __init__(self, engine, max_batch_requests=32, max_wait_ms=5.0, max_queue=1024, policy="continuous"):
            self.policy = policy

    if "policy" not in inspect.signature(open_loop.Scheduler).parameters:
        with pytest.raises(ValueError, match="takes no 'policy'"):
            open_loop.make_scheduler(None, "continuous", 32, 5.0, 10)
        assert open_loop.make_scheduler(object(), "batch", 32, 5.0, 10).max_batch_requests == 32
    monkeypatch.setattr(open_loop, "Scheduler", Fake)
    assert [open_loop.make_scheduler(None, p, 32, 5.0, 10).policy for p in ("batch", "continuous")] == [
        "batch", "continuous"]
    with pytest.raises(ValueError, match="unknown scheduler policy"):
        open_loop.make_scheduler(None, "fifo", 32, 5.0, 10)


def test_encoder_benchmark_runs_on_tiny_bert(tmp_path):
    pytest.importorskip("peft")
    from tests.conftest import make_tokenizer
    from tests.test_seq_cls import make_encoder

    make_encoder("bert").save_pretrained(tmp_path / "bert")
    make_tokenizer().save_pretrained(tmp_path / "bert")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "seq_cls.py"), "--model", str(tmp_path / "bert"),
                           "--steps", "3", "--batch-size", "4", "--prompt-tokens", "3", "--tasks", "3",
                           "--requests", "5", "--repeats", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("throughput ratio softprompt/peft") == 2
    # every side equals the one-request-at-a-time reference, and both train what the reference computes
    assert ("label agreement with the reference: softprompt 1.0000, peft length-sorted 1.0000, peft arrival order "
            "1.0000") in out
    assert "against PEFT's strongest exact setup (length-sorted batches)" in out
    grads = out.split("over its largest entry: ")[1].splitlines()[0]
    assert all(float(v.split()[1]) < 1e-5 for v in grads.split(", "))
    drift = float(out.split("largest prompt or head difference after training ")[1].split()[0])
    assert drift < 1e-4  # both sides train the same prompt and head


def test_train_step_benchmark_refuses_to_time_sides_that_disagree(tiny_model_dir, monkeypatch, capsys):
    pytest.importorskip("peft")
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    bench = importlib.import_module("train_step")
    real = bench.PeftTargets.loss
    monkeypatch.setattr(bench.PeftTargets, "loss", lambda self, batch: real(self, batch) * 1.001)
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", str(tiny_model_dir), "--steps", "1", "--warmup",
                                      "0", "--batch-size", "2", "--device", "cpu"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 1
    out = capsys.readouterr()
    assert "different losses" in out.err and "tok/s" not in out.out


def test_random_model_folder_feeds_the_benchmarks(tiny_model_dir, tmp_path):
    """benchmarks/random_model.py writes a loadable folder of the asked shape with the given tokenizer."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "rand"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "random_model.py"), "--shape", "tiny",
                           "--tokenizer", str(tiny_model_dir), "--out", str(out), "--dtype", "float32"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from softprompt.model import load_base_model
    from tests.conftest import make_tokenizer

    model, tok = load_base_model(out, device="cpu")
    assert model.config.hidden_size == 64 and model.config.vocab_size == 49152 and len(tok) == len(make_tokenizer())


def test_join_latency_benchmark_runs_on_tiny_model(wordy_model_dir):
    pytest.importorskip("fastapi")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = REPO / "benchmarks" / "join_latency.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(wordy_model_dir), "--tasks", "4",
                           "--prompt-tokens", "3", "--long-tokens", "12", "--short-tokens", "2",
                           "--after", "2", "--repeats", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert "answers equal the requests run alone" in out[0]
    rows = {ln.split()[0]: ln.split()[1:] for ln in out[2:4]}
    assert set(rows) == {"batch", "continuous"} and all(float(v) > 0 for r in rows.values() for v in r)
    assert any(ln.startswith("short-request latency, batch / continuous:") for ln in out)


ENGINE_TINY = ["--tasks", "3", "--requests", "5", "--prompt-tokens", "4", "--batch-size", "4", "--new-tokens", "6",
               "--repeats", "1", "--device", "cpu"]


def test_engine_benchmark_exits_1_when_our_decode_leaves_the_reference(tiny_model_dir, monkeypatch, capsys):
    pytest.importorskip("peft")
    engine_bench = bench(monkeypatch, "engine")
    real = engine_bench.causal.decode

    def planted(*args, **kwargs):  # our decoder's third new token is another one
        out = real(*args, **kwargs)
        for row in out.tokens:
            if len(row) > 2:
                row[2] = (row[2] + 1) % 64
        return out

    monkeypatch.setattr(engine_bench.causal, "decode", planted)
    with pytest.raises(SystemExit) as stop:
        engine_bench.main(["--model", str(tiny_model_dir), "--only", "generate", *ENGINE_TINY])
    assert stop.value.code == 1
    out = capsys.readouterr()
    ours = next(ln for ln in out.out.splitlines() if ln.strip().startswith("softprompt, cached prompt"))
    assert "WRONG: leaves the reference decode at new token 3, not timed" in ours
    assert "ms/token" not in out.out and "softprompt, cached prompt" in out.err


def test_engine_benchmark_reports_peft_generate_wrong_without_failing(tiny_model_dir, monkeypatch, capsys):
    """PEFT's prompt-tuning generate is wrong with this transformers (README): reported, not fatal."""
    peft = pytest.importorskip("peft")
    engine_bench = bench(monkeypatch, "engine")
    real = peft.PeftModelForCausalLM.generate

    def planted(self, *args, **kwargs):  # its second new token is another one
        out = real(self, *args, **kwargs)
        if out.shape[1] > kwargs["input_ids"].shape[1] + 1:
            out[:, kwargs["input_ids"].shape[1] + 1] = (out[:, kwargs["input_ids"].shape[1] + 1] + 1) % 64
        return out

    monkeypatch.setattr(peft.PeftModelForCausalLM, "generate", planted)
    engine_bench.main(["--model", str(tiny_model_dir), "--only", "generate", *ENGINE_TINY])
    lines = {ln.strip().split("  ")[0]: ln for ln in capsys.readouterr().out.splitlines() if "ms/token" in ln
             or "WRONG" in ln}
    assert "WRONG: leaves the reference decode at new token 2, known" in lines["peft generate with the prompt"]
    assert "ms/token" in lines["softprompt, cached prompt"] and len(lines) == 5


def test_engine_classify_benchmark_lays_out_a_bos_tokenizer_as_the_engine(tmp_path, monkeypatch, capsys):
    """A tokenizer that adds a BOS (Llama, Gemma, Mistral): every side reads [prompt, BOS, text], the layout
    the engine serves a stored prompt with (PEFT's), and every side agrees with the reference."""
    pytest.importorskip("peft")
    from tests.conftest import WORD_IDS, make_model
    from tests.test_bos import word_tokenizer

    tok = word_tokenizer("[BOS] $A", ("[BOS]",))
    bos = tok.bos_token_id
    assert tok("good")["input_ids"][0] == bos
    make_model("llama", seed=1).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine_bench = bench(monkeypatch, "engine")
    seen, real = [], torch.nn.Embedding.forward

    def spy(self, ids):  # every token id any side (engine, reference, PEFT) feeds the model
        seen.append(ids.detach().reshape(-1, ids.shape[-1]).tolist() if ids.dim() else [])
        return real(self, ids)

    monkeypatch.setattr(torch.nn.Embedding, "forward", spy)
    engine_bench.main(["--model", str(tmp_path), "--only", "classify", *ENGINE_TINY])
    assert ("label agreement with the reference: softprompt 1.0000, peft strongest 1.0000, peft default 1.0000"
            in capsys.readouterr().out)
    start = [WORD_IDS["Review"], WORD_IDS[":"]]  # "Review:" opens every rendered request
    texts = [row for rows in seen for row in rows
             if any(row[i:i + 2] == start for i in range(len(row) - 1))]
    assert len(texts) >= 3 * 5 * 4  # the engine's, the reference's and PEFT's two passes (more for warm-ups)
    opened = [(row, i) for row in texts for i in range(len(row) - 1) if row[i:i + 2] == start]
    assert all(i > 0 and row[i - 1] == bos for row, i in opened), [row for row, i in opened if i == 0][:2]


def test_train_step_benchmark_refuses_to_time_a_wrong_prompt_gradient(tiny_model_dir, monkeypatch, capsys):
    """Our loss keeps its value, but its backward (what every timed step runs) gets another prompt gradient."""
    pytest.importorskip("peft")
    train_bench = bench(monkeypatch, "train_step")
    real = train_bench.Ours.loss

    def planted(self, batch):  # the same value, a gradient 1% too large
        loss = real(self, batch)
        return loss * 1.01 - (loss * 0.01).detach()

    monkeypatch.setattr(train_bench.Ours, "loss", planted)
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", str(tiny_model_dir), "--steps", "1", "--warmup",
                                      "0", "--batch-size", "2", "--device", "cpu"])
    with pytest.raises(SystemExit) as stop:
        train_bench.main()
    assert stop.value.code == 1
    out = capsys.readouterr()
    assert "different prompt gradients from the same prompt: softprompt (" in out.err and "tok/s" not in out.out
    assert "different losses" not in out.err  # the loss itself is right


def test_train_step_benchmark_names_the_prompt_pass_it_ran(tiny_model_dir, monkeypatch, capsys):
    """``--prompt-pass auto`` is ``concat`` on CUDA: the output names that pass and credits no prompt sharing."""
    pytest.importorskip("peft")
    train_bench = bench(monkeypatch, "train_step")
    real = train_bench.causal.prompt_for_step
    asked = []

    def as_on_cuda(model, prompt, mode="auto"):
        asked.append(mode)
        return real(model, prompt, "concat" if mode == "auto" else mode)

    monkeypatch.setattr(train_bench.causal, "prompt_for_step", as_on_cuda)
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", str(tiny_model_dir), "--steps", "1", "--warmup",
                                      "0", "--batch-size", "2", "--device", "cpu"])
    monkeypatch.setattr(train_bench.subprocess, "run", lambda *a, **k: types.SimpleNamespace(
        stdout='{"peak_extra_mib": 1.0}'))  # the memory children are other processes: not what this checks
    train_bench.main()
    out = capsys.readouterr().out
    assert set(asked) == {"auto"} and "softprompt prompt pass: concat (--prompt-pass auto)" in out
    ratio = next(ln for ln in out.splitlines() if ln.startswith("throughput ratio"))
    assert "from sharing the prompt" not in ratio and "both run the prompt with every row, the concat pass" in ratio


def test_encoder_benchmark_refuses_to_time_results_off_the_reference(tmp_path, monkeypatch, capsys):
    """A planted wrong gradient in our train step, a planted wrong label from our engine: each exits 1 untimed."""
    pytest.importorskip("peft")
    from tests.conftest import make_tokenizer
    from tests.test_seq_cls import make_encoder

    make_encoder("bert").save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    seq_cls = bench(monkeypatch, "seq_cls")
    flags = ["--model", str(tmp_path), "--steps", "2", "--batch-size", "4", "--prompt-tokens", "3", "--tasks", "2",
             "--requests", "3", "--repeats", "1", "--device", "cpu"]
    real_family = seq_cls.family_of

    def planted_family(model):  # our loss keeps its value, its gradient is 1% too large
        family = real_family(model)

        class Planted(type(family)):
            def loss(self, model, batch, prompt):
                loss = family.loss(model, batch, prompt)
                return loss * 1.01 - (loss * 0.01).detach()

        return Planted()

    monkeypatch.setattr(seq_cls, "family_of", planted_family)
    with pytest.raises(SystemExit) as stop:
        seq_cls.main([*flags, "--only", "train"])
    assert stop.value.code == 1
    out = capsys.readouterr()
    assert "seq_cls train: softprompt gradients not the reference's" in out.err and "examples/s" not in out.out

    real_classify = seq_cls.Engine.classify

    def planted_classify(self, reqs):  # the second answer's label is the other one
        results = real_classify(self, reqs)
        if len(results) > 1:
            results[1].label = seq_cls.LABELS[1 - seq_cls.LABELS.index(results[1].label)]
        return results

    monkeypatch.setattr(seq_cls, "family_of", real_family)
    monkeypatch.setattr(seq_cls.Engine, "classify", planted_classify)
    with pytest.raises(SystemExit) as stop:
        seq_cls.main([*flags, "--only", "classify"])
    assert stop.value.code == 1
    out = capsys.readouterr()
    assert "seq_cls classify: softprompt WRONG (agreement with the reference < 1.0)" in out.err
    assert "label agreement with the reference: softprompt 0.8333, peft length-sorted 1.0000" in out.out
    assert "req/s" not in out.out


JOIN = ["--tasks", "4", "--prompt-tokens", "3", "--long-tokens", "12", "--short-tokens", "2", "--after", "2",
        "--repeats", "1", "--device", "cpu"]


def test_join_latency_ratio_is_batch_over_continuous_whatever_the_order(wordy_model_dir, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    join = bench(monkeypatch, "join_latency")
    join.main(["--model", str(wordy_model_dir), *JOIN, "--policies", "continuous,batch"])
    out = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in out[2:4]}
    assert list(rows) == ["continuous", "batch"]
    ratio = next(ln for ln in out if ln.startswith("short-request latency, batch / continuous:"))
    # the rows print to 0.01 s and the ratio to 0.1, computed from the unrounded times: the printed ratio is one
    # those rounded rows allow (an exact match of the ratio of the rounded rows failed on rounding alone)
    printed, (b, c) = float(ratio.split(": ")[1].rstrip("x")), (rows["batch"][0], rows["continuous"][0])
    assert (b - 0.005) / (c + 0.005) - 0.05 <= printed <= (b + 0.005) / max(c - 0.005, 1e-9) + 0.05, (printed, b, c)


def test_join_latency_refuses_a_short_request_sent_after_the_long_one(monkeypatch, capsys):
    join = bench(monkeypatch, "join_latency")
    with pytest.raises(SystemExit) as stop:
        join.main([*JOIN, "--after", "12", "--policies", "batch,fifo"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--after 12: the short request is sent after this many chunks of the long generation, so it must be " \
           "at least 1 and below --long-tokens 12" in err and "--policies 'batch,fifo'" in err


def test_join_latency_reports_a_failed_long_generation_at_once(wordy_model_dir, monkeypatch, capsys):
    """The long stream fails: exit 1 naming it, not a 10-minute wait and a KeyError."""
    pytest.importorskip("fastapi")
    import threading

    import httpx

    join = bench(monkeypatch, "join_latency")

    class Event(threading.Event):  # a wait for a signal that never comes ends in 20 s here, not 600
        def wait(self, timeout=None):
            return super().wait(None if timeout is None else min(timeout, 20))

    def broken_stream(*args, **kwargs):
        raise httpx.RemoteProtocolError("planted: the server closed the stream")

    monkeypatch.setattr(join, "threading", types.SimpleNamespace(Thread=threading.Thread, Event=Event))
    monkeypatch.setattr(join, "httpx", types.SimpleNamespace(stream=broken_stream, post=httpx.post, get=httpx.get,
                                                             HTTPError=httpx.HTTPError))
    with pytest.raises(SystemExit) as stop:
        join.main(["--model", str(wordy_model_dir), *JOIN])
    assert stop.value.code == 1
    out = capsys.readouterr()
    assert "join_latency: the long generation failed: RemoteProtocolError: planted: the server closed the stream" \
           in out.err and "short p50" not in out.out


def test_flop_floor_counts_the_arithmetic_each_train_step_side_executes(monkeypatch):
    """The floors read against a GPU measurement: each side's formula equals the matrix products its real step
    (loss and backward) executes, counted by torch's FlopCounterMode on a small llama whose LM head weighs as
    much as its layers (attention left out: the CPU's fused attention is not counted there)."""
    pytest.importorskip("peft")
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from softprompt.model import load_base_model

    floor, train_bench = bench(monkeypatch, "flop_floor"), bench(monkeypatch, "train_step")
    tok = load_base_model("smollm2-135m-instruct", "cpu")[1]
    shape = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=len(tok), max_position_embeddings=256)
    p, batches = 30, train_bench.make_batches(tok, 1, 8, "cpu")
    counts = floor.Shape(shape)
    counts.attn = 0
    want = floor.train_flops(counts, batches, p)
    sides = floor.train_sides(tok, p)
    got = {}
    for name, make in sides.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shape, pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
        model.requires_grad_(False)
        side = make(model)
        side.loss(batches[0])  # the first step probes the model once (cached): not part of a step's arithmetic
        with FlopCounterMode(display=False) as fc:
            side.loss(batches[0]).backward()
        got[name] = fc.get_total_flops()
    for name in sides:  # within 3%: autograd skips gradients nothing needs (shared_kv: the text's first-layer
        assert got[name] == pytest.approx(want[name], rel=0.03), (name, got, want)  # input gradients)
    assert want["shared_kv"] < want["concat"] < want["peft_targets"] < want["peft"]


def _gpu_script_tree(tmp_path: Path) -> Path:
    """A copy of benchmarks/gpu_1b.sh beside fake benchmarks that sleep ``FAKE_SLEEP`` s (no model, no torch)."""
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / ".gpu" / "tokenizer").mkdir(parents=True)
    (root / "benchmarks" / "gpu_1b.sh").write_text((REPO / "benchmarks" / "gpu_1b.sh").read_text())
    (root / "benchmarks" / "random_model.py").write_text(
        "import pathlib, sys\nout = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\nout.mkdir(parents=True)\n"
        "(out / 'config.json').write_text('{}')\nprint('wrote', out)\n")
    for name in ("train_step.py", "engine.py"):
        (root / "benchmarks" / name).write_text(
            f"import os, sys, time\ntime.sleep(float(os.environ.get('FAKE_SLEEP', '0')))\nprint('{name} ran', "
            "' '.join(sys.argv[1:]))\n")
    return root


def _gpu_run(root: Path, out: Path, **env) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "DEADLINE"}, "DEVICE": "cpu", "SHAPE": "tiny",
           "MODEL_DIR": str(root / "model"), "TRAIN_CONFIGS": "4:2", "ENGINE_CONFIGS": "", "GENERATE_DTYPES": "", **env}
    return subprocess.run(["bash", str(root / "benchmarks" / "gpu_1b.sh"), "run", str(out)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_gpu_script_cuts_runs_to_their_limits_and_reuses_the_model(tmp_path):
    """gpu_1b.sh: a run over STEP_LIMIT is stopped and says so, one that DEADLINE leaves under 20 s is skipped
    and says so, either fails the call; the model folder is written once and reused; the options reach the
    benchmark."""
    root = _gpu_script_tree(tmp_path)
    ok = _gpu_run(root, tmp_path / "a", PROMPT_PASS="shared_kv", TRAIN_STEPS="7", TRAIN_WARMUP="3")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    log = (tmp_path / "a" / "train_step.log").read_text()
    assert "train_step.py ran" in log and "--prompt-pass shared_kv" in log and "--steps 7 --warmup 3" in log
    assert "wrote" in (tmp_path / "a" / "env.txt").read_text()

    slow = _gpu_run(root, tmp_path / "b", STEP_LIMIT="1", FAKE_SLEEP="5", TRAIN_CONFIGS="4:2 8:2")
    assert slow.returncode == 1
    log = (tmp_path / "b" / "train_step.log").read_text()
    assert log.count("stopped: ran past its 1 s") == 2 and "train_step.py ran" not in log
    assert "reusing" in (tmp_path / "b" / "env.txt").read_text()

    late = _gpu_run(root, tmp_path / "c", DEADLINE=str(int(time.time()) + 10), ENGINE_CONFIGS="4:2")
    assert late.returncode == 1
    assert "skipped: DEADLINE reached" in (tmp_path / "c" / "train_step.log").read_text()
    assert "skipped: DEADLINE reached" in (tmp_path / "c" / "engine.log").read_text()
    assert "engine.py ran" not in (tmp_path / "c" / "engine.log").read_text()


def test_train_step_paired_ratio_is_not_moved_by_a_few_slow_steps(monkeypatch):
    """The per-batch ratio of two sides' step times: one slow warm-up-like step of the base side (which turns the
    ratio of totals around, as on the H200 with 10 timed steps) leaves its median where the other batches put it."""
    train_bench = bench(monkeypatch, "train_step")
    ours = [0.05, 0.05, 0.05, 0.05, 0.5]  # one outlier
    peft = [0.06, 0.06, 0.06, 0.06, 0.06]
    assert sum(peft) / sum(ours) < 1  # the totals say PEFT is faster
    assert train_bench.paired_ratio(peft, ours) == pytest.approx(1.2)
    with pytest.raises(ValueError):
        train_bench.paired_ratio(peft, ours[:-1])  # a side that missed a batch is an error, not a shorter median


def test_flop_floor_refuses_a_malformed_batch_prompt_pair(monkeypatch, capsys):
    floor = bench(monkeypatch, "flop_floor")
    assert floor.batch_prompt("64:100") == (64, 100)
    for bad in ("64", "64:", ":100", "0:20", "16:-1", "a:b", "16:20:1"):
        with pytest.raises(SystemExit) as stop:
            floor.main(["--train", bad, "--classify"])
        assert stop.value.code == 2 and "is not BATCH:PROMPT_TOKENS" in capsys.readouterr().err
