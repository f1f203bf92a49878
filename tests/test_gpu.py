"""CUDA paths: bf16 injection, training and generation on the GPU (skipped without CUDA; run on a lent GPU)."""

from __future__ import annotations

import pytest
import torch

from softprompt import forward
from softprompt.config import TrainArgs
from softprompt.data import Encoded, TaskData, TaskFormat, collate
from softprompt.forward import causal
from softprompt.methods import build_method
from softprompt.model import load_base_model
from softprompt.train import train
from tests.conftest import ARCHS, make_model, sentiment_records, text_logits

pytestmark = pytest.mark.gpu

FMT = TaskFormat("Review: {text}\nSentiment:", "label", {"positive": "positive", "negative": "negative"})


def batch(device):
    items = [Encoded([5, 6, 7, 8, 9, 10, 11], 5), Encoded([12, 13, 14, 15, 16], 3), Encoded([17, 18, 19, 20], 3)]
    return collate(items, pad_id=0).to(device)


def test_auto_dtype_is_bf16_on_cuda(tiny_model_dir):
    model, _ = load_base_model(tiny_model_dir, device="auto")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", ARCHS)
def test_bf16_cuda_logits_match_fp32_cpu(kind):
    torch.manual_seed(0)
    prompt = torch.randn(5, 32)
    cpu = make_model(kind)
    gpu = make_model(kind).to("cuda", torch.bfloat16)
    b_cpu, b_gpu = batch("cpu"), batch("cuda")
    ref = text_logits(cpu, b_cpu.input_ids, b_cpu.attention_mask, forward.compute_prompt_kv(cpu, prompt))
    got = text_logits(gpu, b_gpu.input_ids, b_gpu.attention_mask, forward.compute_prompt_kv(gpu, prompt))
    real = b_cpu.attention_mask.bool()
    assert got.dtype == torch.float32  # the LM head output is upcast before any softmax
    torch.testing.assert_close(got.cpu()[real], ref[real], atol=0.1, rtol=0.05)


def test_fp32_cuda_greedy_generation_matches_cpu():
    cpu, gpu = make_model("llama"), make_model("llama").to("cuda")
    prompt = torch.randn(4, 32)
    b_cpu, b_gpu = batch("cpu"), batch("cuda")
    a = forward.generate(cpu, b_cpu.input_ids, b_cpu.attention_mask, forward.compute_prompt_kv(cpu, prompt), 6, None)
    with torch.no_grad():
        kv = forward.compute_prompt_kv(gpu, prompt)
    b = forward.generate(gpu, b_gpu.input_ids, b_gpu.attention_mask, kv, 6, None)
    assert a == b


def test_bf16_training_on_cuda_moves_fp32_prompt_only(tmp_path, tokenizer):
    model = make_model("llama").to("cuda", torch.bfloat16)
    method = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "random", "init_scale": 0.1},
                          model, tokenizer)
    start = method.embeddings.detach().cpu().clone()
    recs = sentiment_records(40, seed=1)
    data = TaskData(FMT, {"train": [FMT.render(r) for r in recs[:32]],
                          "validation": [FMT.render(r) for r in recs[32:]]})
    result = train(model, tokenizer, method, data, TrainArgs(output_dir=str(tmp_path), max_steps=6, batch_size=8,
                                                             eval_every=3, optimizer="adamw", lr=0.05, seed=0))
    assert result.steps == 6
    assert method.embeddings.dtype == torch.float32 and method.embeddings.device.type == "cuda"
    assert torch.isfinite(method.embeddings).all() and not torch.equal(start, method.embeddings.detach().cpu())
    assert all(p.grad is None for p in model.parameters())


def test_concat_and_shared_kv_passes_agree_on_cuda():
    model = make_model("qwen2").to("cuda")
    prompt = torch.randn(5, 32, device="cuda")
    b = batch("cuda")
    a = causal.target_logprobs(model, b, causal.prompt_for_step(model, prompt, "shared_kv"))
    c = causal.target_logprobs(model, b, causal.prompt_for_step(model, prompt, "concat"))
    torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_engine_mixed_batches_on_cuda_bf16_match_cpu_fp32(tmp_path, tokenizer):
    from softprompt.engine import ClassifyRequest, Engine, GenerateRequest
    from softprompt.store import load_prompt, save_prompt

    task = {"template": "Review: {text}\nSentiment:", "target_field": "label",
            "verbalizer": {"positive": "positive", "negative": "negative"}}
    cpu, gpu = make_model("qwen2"), make_model("qwen2").to("cuda", torch.bfloat16)
    engines = [Engine(cpu, tokenizer, max_batch_rows=3), Engine(gpu, tokenizer, max_batch_rows=3)]
    for name, n in (("a", 3), ("b", 7)):
        method = build_method("prompt_tuning", {"num_virtual_tokens": n, "init": "random", "seed": n}, cpu, tokenizer)
        save_prompt(tmp_path / name, method, cpu, task=task)
        for e in engines:
            e.add_prompt(name, load_prompt(tmp_path / name, e.model))
    reqs = [ClassifyRequest(t, x) for x in ("good movie", "bad plot", "the film was awful") for t in ("a", "b")]
    ref, got = (e.classify(reqs) for e in engines)
    for r, g in zip(ref, got, strict=True):
        assert g.scores == pytest.approx(r.scores, abs=0.1)
    gen = engines[1].generate([GenerateRequest("a", "good", max_tokens=3), GenerateRequest("b", "bad plot",
                                                                                         max_tokens=3)])
    assert all(len(g.tokens) <= 3 for g in gen)
