"""Causal-LM families the main tests do not build: each is either computed right or refused with a clear error."""

from __future__ import annotations

import torch
import transformers as T

from softprompt import forward
from softprompt.data import Encoded, collate
from softprompt.forward import causal

V = 64
IDS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]


def frozen(model):
    return model.eval().requires_grad_(False)


def prompt_for(model, p: int = 3, seed: int = 1) -> torch.Tensor:
    """``(P, H)`` prompt embeddings at the scale of the model's own embeddings."""
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings()
    scale = float(emb(torch.arange(10)).std())
    return torch.randn(p, emb.weight.shape[1], generator=gen) * scale


def reference_logits(model, prompt, ids: list[int]) -> torch.Tensor:
    """The plain forward of one unpadded row, ``[prompt embeddings + text embeddings]``: ``(T, V)``."""
    emb = model.get_input_embeddings()(torch.tensor([ids]))
    if prompt is not None:
        emb = torch.cat([prompt[None], emb], 1)
    logits = model(inputs_embeds=emb).logits[0].float()
    return logits[prompt.shape[0]:] if prompt is not None else logits


def worst_error(model, prompt, padding_side: str = "right", cached: bool = True) -> float:
    """Largest difference between softprompt's logits of :data:`IDS` and the per-row reference."""
    batch = collate([Encoded(r, len(r)) for r in IDS], 0, padding_side)
    with torch.no_grad():
        pr = causal.compute_prompt_kv(model, prompt) if cached else prompt
        logits = forward.logits_from_hidden(model, causal.final_hidden(model, batch.input_ids,
                                                                        batch.attention_mask, pr))
        return max(float((logits[i][batch.attention_mask[i].bool()] - reference_logits(model, prompt, r)).abs().max())
                   for i, r in enumerate(IDS))


def make_ctrl():
    torch.manual_seed(0)
    return frozen(T.CTRLLMHeadModel(T.CTRLConfig(vocab_size=V, n_embd=32, dff=64, n_layer=2, n_head=4,
                                                 n_positions=64)))


def test_a_model_that_scales_its_input_embeddings_in_place_leaves_the_prompt_alone():
    """CTRL multiplies ``inputs_embeds`` in place: the caller's prompt was scaled by sqrt(H) on every
    compute_prompt_kv, and a shared_kv training step raised (an in-place op on a leaf that requires grad)."""
    model = make_ctrl()
    prompt = prompt_for(model)
    before = prompt.clone()
    with torch.no_grad():
        causal.compute_prompt_kv(model, prompt)
    assert torch.equal(prompt, before)
    assert worst_error(model, prompt) < 1e-4
    param = torch.nn.Parameter(prompt.clone())
    batch = collate([Encoded([5, 6, 7, 8], 2), Encoded([9, 10, 11], 1)], 0)
    loss = causal.target_loss(model, batch, causal.prompt_for_step(model, param, "shared_kv"))
    loss.backward()
    assert param.grad is not None and torch.isfinite(param.grad).all()
    assert torch.equal(param.detach(), prompt)
