"""Shared fixtures: tiny random causal LMs built from configs and an in-memory tokenizer (no downloads)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from softprompt.model import prepare_frozen

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 64
WORDS = ["[PAD]", "[EOS]", "[UNK]", "Review", ":", "Sentiment", "positive", "negative", "good", "bad", "great",
         "awful", "movie", "film", "plot", "the", "a", "was", "is", "very", "not", "Country", "Capital",
         "France", "Paris", "Spain", "Madrid", "Italy", "Rome", "Classify", "sentiment", "."]
WORD_IDS = {w: i for i, w in enumerate(WORDS)}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS`; ids < :data:`VOCAB`."""
    inner = Tokenizer(models.WordLevel(WORD_IDS, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def make_model(kind: str = "llama", seed: int = 0):
    """A tiny random frozen causal LM of the given architecture."""
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=None, eos_token_id=1)
        model = LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                         eos_token_id=1, pad_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=None, eos_token_id=1)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "gemma3":
        # its embedding module multiplies the rows by sqrt(hidden_size) (5.66 here): what the model consumes
        # is not the raw weight rows; one sliding and one full attention layer, as the real family mixes them
        cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                               max_position_embeddings=256, sliding_window=128,
                               layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                               bos_token_id=None, eos_token_id=1)
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    prepare_frozen(model)
    return model


ARCHS = ["llama", "gpt2", "qwen2"]


@pytest.fixture(params=ARCHS)
def arch_model(request):
    return make_model(request.param)


@pytest.fixture
def model():
    return make_model("llama")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy sentiment task over the tiny vocabulary."""
    import random

    rng = random.Random(seed)
    pos, neg = ["good", "great"], ["bad", "awful"]
    fill = ["the", "movie", "film", "plot", "was", "is", "very", "a"]
    out = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(fill, 3) + [rng.choice(pos if label == "positive" else neg)] + rng.sample(fill, 2)
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tiny_model_dir(tmp_path_factory):
    """A tiny llama + tokenizer saved as a local model folder (what a user passes as --model DIR)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = make_model("llama")
    model.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def serve(app):
    """Run an ASGI ``app`` under uvicorn on a free 127.0.0.1 port in a thread; returns ``(url, stop)``."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def gate_runs(monkeypatch, engine) -> tuple[threading.Event, list]:
    """Engine batches and running-batch steps wait until the returned event is set (``gate.entered`` is set
    once one waits); the list collects every item that ran or joined a running batch."""
    from softprompt.engine.running import RunningBatch

    gate, ran = threading.Event(), []
    gate.entered = threading.Event()
    real, real_step, real_admit = engine.run, RunningBatch.step, RunningBatch.admit

    def run(kind, items, on_token=None, cancelled=None, **kw):
        gate.entered.set()
        assert gate.wait(60)
        ran.extend(items)
        return real(kind, items, on_token, cancelled, **kw)

    def step(self):
        gate.entered.set()
        assert gate.wait(60)
        return real_step(self)

    def admit(self, item, *args, **kwargs):
        if not any(x is item for x in ran):  # (a batch-at-a-time run's generations join one too)
            ran.append(item)
        return real_admit(self, item, *args, **kwargs)

    monkeypatch.setattr(engine, "run", run)
    monkeypatch.setattr(RunningBatch, "step", step)
    monkeypatch.setattr(RunningBatch, "admit", admit)
    return gate, ran


def torchrun(script: str, out: Path, processes: int = 2):
    """Run ``tests/scripts/<script>`` under ``torch.distributed.run`` on 127.0.0.1 (a free port); the process."""
    import socket
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                           "--master_addr", "127.0.0.1", "--master_port", str(port),
                           str(repo / "tests" / "scripts" / script), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run only where CUDA is present (never in CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def text_logits(model, input_ids, attention_mask, prompt_kv=None):
    """Full logits over the text positions ``(B, T, V)`` with the prompt in front: the reference the
    equivalence tests compare against (the package applies the LM head only where it needs logits)."""
    from softprompt.forward import logits_from_hidden
    from softprompt.forward.causal import final_hidden

    return logits_from_hidden(model, final_hidden(model, input_ids, attention_mask, prompt_kv))


@pytest.fixture
def engine_sources(monkeypatch) -> list[list[str]]:
    """The source texts of every ``evaluate_on_engine`` call made during the test (which split was read)."""
    import softprompt.evaluate

    seen, real = [], softprompt.evaluate.evaluate_on_engine

    def spy(engine, runs, examples, fmt, *args, **kwargs):
        seen.append([ex.source for ex in examples])
        return real(engine, runs, examples, fmt, *args, **kwargs)

    monkeypatch.setattr(softprompt.evaluate, "evaluate_on_engine", spy)
    return seen
