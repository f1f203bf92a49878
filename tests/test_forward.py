"""The shared prompt-KV forward equals prepending the prompt to every row's inputs_embeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softprompt import forward
from softprompt.data import Encoded, collate
from softprompt.forward import causal
from tests.conftest import make_model, text_logits

P = 5


def concat_logits(model, prompt, ids, mask):
    """Reference: the plain HF forward with the prompt prepended to inputs_embeds (right padding only)."""
    b = ids.shape[0]
    embeds = torch.cat([prompt[None].expand(b, -1, -1), model.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(b, prompt.shape[0], dtype=mask.dtype), mask], 1)
    return model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, prompt.shape[0]:]


def right_padded_batch():
    items = [Encoded([5, 6, 7, 8, 9, 10, 11], 5), Encoded([12, 13, 14, 15, 16], 3), Encoded([17, 18, 19, 20], 3)]
    return collate(items, pad_id=0)


def test_logits_match_concatenated_forward(arch_model):
    torch.manual_seed(1)
    prompt = torch.randn(P, 32)
    batch = right_padded_batch()
    ours = text_logits(arch_model, batch.input_ids, batch.attention_mask,
                              forward.compute_prompt_kv(arch_model, prompt))
    ref = concat_logits(arch_model, prompt, batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prompt_pass", ["shared_kv", "concat"])
def test_loss_and_gradients_match_hf_labels(arch_model, prompt_pass):
    torch.manual_seed(2)
    prompt = torch.randn(P, 32, requires_grad=True)
    batch = right_padded_batch()
    loss = causal.target_loss(arch_model, batch, causal.prompt_for_step(arch_model, prompt, prompt_pass))
    (grad,) = torch.autograd.grad(loss, prompt)

    ref_prompt = prompt.detach().clone().requires_grad_(True)
    b = batch.input_ids.shape[0]
    embeds = torch.cat([ref_prompt[None].expand(b, -1, -1), arch_model.get_input_embeddings()(batch.input_ids)], 1)
    mask = torch.cat([torch.ones(b, P, dtype=torch.long), batch.attention_mask], 1)
    labels = torch.cat([torch.full((b, P), -100), batch.input_ids.masked_fill(~batch.target_mask, -100)], 1)
    ref_loss = arch_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_prompt)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("prompt_pass", ["shared_kv", "concat"])
def test_left_and_right_padding_agree(arch_model, prompt_pass):
    torch.manual_seed(3)
    kv = causal.prompt_for_step(arch_model, torch.randn(P, 32), prompt_pass)
    items = [Encoded([5, 6, 7, 8, 9, 10], 4), Encoded([11, 12, 13], 2)]
    right, left = collate(items, 0, "right"), collate(items, 0, "left")
    lr = causal.target_logprobs(arch_model, right, kv)
    ll = causal.target_logprobs(arch_model, left, kv)
    torch.testing.assert_close(lr, ll, atol=1e-5, rtol=1e-5)
    assert forward.text_position_ids(left.attention_mask, P)[1].tolist() == [P, P, P, P, P + 1, P + 2]


def test_target_logprobs_sums_per_row(model):
    torch.manual_seed(4)
    kv = forward.compute_prompt_kv(model, torch.randn(P, 32))
    batch = right_padded_batch()
    lp = causal.target_logprobs(model, batch, kv)
    logits = text_logits(model, batch.input_ids, batch.attention_mask, kv).log_softmax(-1)
    expected = []
    for r in range(3):
        pos = torch.nonzero(batch.target_mask[r]).flatten().tolist()
        expected.append(sum(float(logits[r, t - 1, batch.input_ids[r, t]]) for t in pos))
    torch.testing.assert_close(lp, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_no_prompt_matches_plain_model(model):
    batch = right_padded_batch()
    ours = text_logits(model, batch.input_ids, batch.attention_mask, None)
    ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generation_matches_step_by_step_reference(kind):
    model = make_model(kind, seed=5)
    torch.manual_seed(5)
    prompt = torch.randn(P, 32)
    kv = forward.compute_prompt_kv(model, prompt)
    rows = [[5, 6, 7, 8], [9, 10]]
    batch = collate([Encoded(r, len(r)) for r in rows], 0, "left")
    new = forward.generate(model, batch.input_ids, batch.attention_mask, kv, max_new_tokens=6, eos_token_id=None)
    for r, got in zip(rows, new, strict=True):
        ids = list(r)
        for _ in range(6):  # reference: full recomputation with the prompt prepended, no cache, no padding
            logits = concat_logits(model, prompt, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
            ids.append(int(logits[0, -1].argmax()))
        assert got == ids[len(r):]


def test_generation_stops_at_eos(model):
    batch = collate([Encoded([5, 6, 7], 3)], 0)
    free = forward.generate(model, batch.input_ids, batch.attention_mask, None, 4, eos_token_id=None)[0]
    stopped = forward.generate(model, batch.input_ids, batch.attention_mask, None, 4, eos_token_id=free[1])[0]
    assert stopped == free[:1] if free[0] != free[1] else stopped == []


def test_sampling_is_seeded_and_respects_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    a = forward.sample_next(logits, 1.0, 3, 1.0, torch.Generator().manual_seed(7))
    b = forward.sample_next(logits, 1.0, 3, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    top3 = logits.topk(3, dim=-1).indices
    assert all(int(a[i]) in top3[i].tolist() for i in range(4))
    # top_p tiny keeps only the most likely token
    c = forward.sample_next(logits, 1.0, 0, 1e-6, torch.Generator().manual_seed(1))
    assert torch.equal(c, logits.argmax(-1))
    assert torch.equal(forward.sample_next(logits, 0.0, 0, 1.0, None), logits.argmax(-1))


@pytest.mark.parametrize(("probs", "top_p", "kept"), [([0.25] * 4, 0.5, 2), ([0.5, 0.3, 0.2], 0.5, 1),
                                                      ([0.5, 0.3, 0.2], 0.51, 2), ([0.5, 0.3, 0.2], 1.0, 3)])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_it(probs, top_p, kept):
    # as HF's TopPLogitsWarper: a set that reaches top_p exactly is enough (it kept one more token)
    logits = torch.tensor(probs).log()[None].repeat(400, 1)
    drawn = forward.sample_next(logits, 1.0, 0, top_p, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == set(range(kept))


def test_bad_prompt_shape_names_expected_shape(model):
    with pytest.raises(forward.InjectionError, match=r"shape \(5, 16\), expected \(P, 32\)"):
        forward.compute_prompt_kv(model, torch.randn(5, 16))


def test_target_at_position_zero_is_refused(model):
    batch = collate([Encoded([5, 6], 0)], 0)
    with pytest.raises(forward.InjectionError, match="position 0"):
        causal.target_loss(model, batch, None)


def test_loss_uses_fp32_cross_entropy_over_targets_only(model):
    batch = right_padded_batch()
    h = causal.final_hidden(model, batch.input_ids, batch.attention_mask, None)
    sel = batch.target_mask[:, 1:]
    expected = F.cross_entropy(model.lm_head(h[:, :-1][sel]).float(), batch.input_ids[:, 1:][sel])
    torch.testing.assert_close(causal.target_loss(model, batch, None), expected)


def test_last_token_logprobs_left_and_right_padding(model):
    kv = forward.compute_prompt_kv(model, torch.randn(P, 32))
    items = [Encoded([5, 6, 7, 8], 4), Encoded([9, 10], 2)]
    left, right = collate(items, 0, "left"), collate(items, 0, "right")
    a = causal.last_token_logprobs(model, left.input_ids, left.attention_mask, kv)
    b = causal.last_token_logprobs(model, right.input_ids, right.attention_mask, kv)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    full = text_logits(model, right.input_ids, right.attention_mask, kv).log_softmax(-1)
    torch.testing.assert_close(b[1], full[1, 1], atol=1e-5, rtol=1e-5)


def test_forward_and_generate_use_the_cache_argument_this_transformers_takes(arch_model):
    """transformers 5.24 deprecated ``past_key_values`` (removed in 5.40): no deprecation warning may fire."""
    import warnings

    batch = right_padded_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        kv = forward.compute_prompt_kv(arch_model, torch.randn(P, 32))
        text_logits(arch_model, batch.input_ids, batch.attention_mask, kv)
        forward.generate(arch_model, batch.input_ids, batch.attention_mask, kv, max_new_tokens=2, eos_token_id=None)


def test_prompt_pass_auto_and_bad_name(model):
    prompt = torch.randn(P, 32)
    assert isinstance(causal.prompt_for_step(model, prompt, "auto"), forward.PromptKV)  # CPU: shared keys/values
    assert causal.prompt_for_step(model, prompt, "concat") is prompt
    with pytest.raises(forward.InjectionError, match="prompt pass 'fast'"):
        causal.prompt_for_step(model, prompt, "fast")
    with pytest.raises(forward.InjectionError, match=r"expected \(P, 32\)"):
        causal.prompt_for_step(model, torch.randn(P, 8), "concat")
