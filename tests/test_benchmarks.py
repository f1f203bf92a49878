"""The benchmark scripts run end to end on a tiny model (a smoke test: no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert float(out.split("label agreement: ")[1].split()[0]) == 1.0
    diff = float(out.split("(|diff| ")[1].split(")")[0])
    drift = float(out.split("largest prompt difference after training ")[1].split()[0])
    assert diff < 1e-5 and drift < 1e-4  # both sides train the same prompt and head


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
