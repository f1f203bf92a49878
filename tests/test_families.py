"""Causal-LM families the main tests do not build: each is either computed right or refused with a clear error."""

from __future__ import annotations

import contextlib
import io

import pytest
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


def pass_gradients(model, prompt: torch.Tensor) -> list[torch.Tensor]:
    """The prompt's gradient from one training step's loss through the ``shared_kv`` pass, then ``concat``."""
    param = torch.nn.Parameter(prompt.clone())
    batch = collate([Encoded([5, 6, 7, 8], 2), Encoded([9, 10, 11], 1)], 0)
    grads = []
    for mode in ("shared_kv", "concat"):
        param.grad = None
        causal.target_loss(model, batch, causal.prompt_for_step(model, param, mode)).backward()
        grads.append(param.grad.clone())
    return grads


def engine_with_prompts(model, tokenizer, tmp_path):
    """An engine serving two stored random prompts, ``sent`` (classification) and ``caps`` (generation), and
    each prompt's embeddings (for a reference forward)."""
    from softprompt.engine import Engine
    from tests.test_engine import CAPS, SENT, stored

    engine = Engine(model, tokenizer, max_batch_rows=4)
    prompts = {name: stored(tmp_path, model, tokenizer, name, n, task, seed)
               for name, n, task, seed in [("sent", 3, SENT, 1), ("caps", 2, CAPS, 3)]}
    for name, p in prompts.items():
        engine.add_prompt(name, p)
    return engine, {k: v.tensors["prompt_embeddings"] for k, v in prompts.items()}


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


def make_gemma3_composite(softcap: float | None = None):
    """A tiny Gemma-3 vision-language model, as the 4B-27B checkpoints load through AutoModelForCausalLM."""
    text = T.Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                              sliding_window=128, layer_types=["sliding_attention", "full_attention"],
                              final_logit_softcapping=softcap, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    cfg = T.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                         image_token_index=63, boi_token_index=61, eoi_token_index=62)
    torch.manual_seed(0)
    return frozen(T.Gemma3ForConditionalGeneration(cfg))


def test_a_composite_gemma3_trains_and_serves_as_its_text_model(tmp_path, tokenizer):
    """Gemma-3 4B/12B/27B load as Gemma3ForConditionalGeneration, whose config keeps the decoder's sizes in its
    text config: compute_prompt_kv read num_hidden_layers from the top level and raised AttributeError."""
    from softprompt.engine import ClassifyRequest, GenerateRequest
    from softprompt.methods import build_method
    from tests.test_engine import CAPS, SENT, ids_of, ref_label_scores

    model = make_gemma3_composite()
    prompt = prompt_for(model)
    for side in ("right", "left"):
        assert worst_error(model, prompt, side) < 1e-4
    grads = pass_gradients(model, prompt)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    prefix = build_method("prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, model, tokenizer)
    with torch.no_grad():
        assert [k.shape for k, _ in causal.compute_prompt_kv(model, prefix()).layers] == [(1, 2, 3, 8)] * 2

    engine, embeds = engine_with_prompts(model, tokenizer, tmp_path)
    for text, res in zip(["the movie was great", "a bad plot"],
                         engine.classify([ClassifyRequest("sent", t) for t in ["the movie was great", "a bad plot"]]),
                         strict=True):
        assert res.scores == pytest.approx(ref_label_scores(model, tokenizer, embeds["sent"], SENT, text), abs=1e-4)
    for country, res in zip(["France", "Spain"], engine.generate([GenerateRequest("caps", {"country": c}, max_tokens=4)
                                                                  for c in ["France", "Spain"]]), strict=True):
        ids = ids_of(tokenizer, CAPS["template"].format(country=country))
        n = len(ids)
        for _ in range(4):
            with torch.no_grad():
                nxt = int(reference_logits(model, embeds["caps"], ids)[-1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            ids.append(nxt)
        assert res.tokens == ids[n:]


LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)


@pytest.mark.parametrize(("kind", "factor"), [("granite", 1 / 8), ("hyperclovax", 0.25)])
def test_a_logit_scaling_after_the_head_is_applied(kind, factor):
    """Granite divides its logits by ``logits_scaling`` (8 here), HyperCLOVAX multiplies by it: softprompt
    dropped both, so its log-probabilities, losses and sampling temperature were not the model's."""
    torch.manual_seed(0)
    if kind == "granite":
        model = frozen(T.GraniteForCausalLM(T.GraniteConfig(logits_scaling=8.0, **LLAMA_LIKE)))
    else:
        model = frozen(T.HyperCLOVAXForCausalLM(T.HyperCLOVAXConfig(logits_scaling=0.25, **LLAMA_LIKE)))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        own = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        ours = causal.last_token_logprobs(model, ids, torch.ones_like(ids), None)[0]
    assert (own - ours).abs().max() < 1e-5
    assert worst_error(model, prompt_for(model)) < 1e-4
    assert forward.logits_from_hidden(model, torch.ones(1, 32)).shape == (1, V)
    from softprompt.forward.head import head_op

    assert head_op(model).scale == pytest.approx(factor)


def make_roberta_causal():
    cfg = T.RobertaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=66, is_decoder=True, pad_token_id=1,
                          architectures=["RobertaForCausalLM"])
    torch.manual_seed(0)
    return frozen(T.RobertaForCausalLM(cfg))


def test_an_encoder_style_causal_lm_is_refused_naming_what_differs(tmp_path, tokenizer):
    """RobertaForCausalLM's head transforms the hidden states (dense, GELU, LayerNorm) before the projection and its
    positions start at pad_token_id + 1: it was accepted as a causal LM and gave other logits even without a prompt.
    """
    model = make_roberta_causal()
    with pytest.raises(forward.InjectionError, match=r"RobertaForCausalLM cannot take prompts: .*positions.*"
                                                     r"its head computes more than get_output_embeddings"):
        causal.last_token_logprobs(model, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), None)
    assert forward.family_of(model).model_problem(model).startswith("RobertaForCausalLM cannot take prompts")

    from softprompt.cli import main

    model.save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["generate", "--model", str(tmp_path / "roberta"), "--input", "the movie", "--device", "cpu"])
    assert rc == 2 and "RobertaForCausalLM cannot take prompts" in err.getvalue()


def make_mamba():
    torch.manual_seed(0)
    return frozen(T.MambaForCausalLM(T.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, state_size=4,
                                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)))


def make_lfm2():
    torch.manual_seed(0)
    return frozen(T.Lfm2ForCausalLM(T.Lfm2Config(layer_types=["conv", "full_attention"], **LLAMA_LIKE)))


@pytest.mark.parametrize("make", [make_mamba, make_lfm2], ids=["mamba", "lfm2"])
def test_a_model_whose_cache_keeps_recurrent_state_refuses_a_cached_prompt(make):
    """Mamba keeps an SSM state and LFM2 a convolution state per layer: a cached prompt kept only (keys, values)
    and crashed with an AttributeError (Mamba) or lost the state (hybrids). The cached path is refused, naming the
    model and its layer; a training step prepending the prompt (concat) is exact and is what ``auto`` picks."""
    model = make()
    name = type(model).__name__
    prompt = prompt_for(model)
    with pytest.raises(forward.InjectionError, match=rf"{name} cannot cache a prompt: layer 0 of {name}'s cache is "
                                                     r"a LinearAttentionLayer.*concat pass"):
        causal.compute_prompt_kv(model, prompt)
    assert "serves with a cached prompt" in forward.family_of(model).model_problem(model)
    assert worst_error(model, prompt, cached=False) < 1e-4
    param = torch.nn.Parameter(prompt.clone())
    step = causal.prompt_for_step(model, param, "auto")
    assert step is param
    causal.target_loss(model, collate([Encoded([5, 6, 7, 8], 2)], 0), step).backward()
    assert param.grad is not None


def test_a_model_that_reads_ids_otherwise_than_their_embeddings_refuses_prompts():
    """Falcon-H1 multiplies the embeddings of token ids by ``embedding_multiplier`` and not ``inputs_embeds``
    (and keeps SSM state in its cache): a prompt of embeddings met text the model never reads."""
    cfg = T.FalconH1Config(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8,
                           lm_head_multiplier=1.0, embedding_multiplier=2.0, **LLAMA_LIKE)
    torch.manual_seed(0)
    model = frozen(T.FalconH1ForCausalLM(cfg))
    for run in (lambda: causal.compute_prompt_kv(model, prompt_for(model)),
                lambda: causal.prompt_for_step(model, prompt_for(model), "concat")):
        with pytest.raises(forward.InjectionError, match="FalconH1ForCausalLM computes something else from token ids "
                                                         "than from its embedding module's output"):
            run()


def test_a_head_class_whose_base_model_is_itself_runs_its_decoder():
    """Llama4ForCausalLM's base_model_prefix names no submodule, so base_model was the whole model and every
    forward failed (an output without last_hidden_state); its decoder stack is its ``model``."""
    cfg = T.Llama4TextConfig(intermediate_size_mlp=64, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                             **LLAMA_LIKE)
    torch.manual_seed(0)
    model = frozen(T.Llama4ForCausalLM(cfg))
    assert forward.family_of(model).model_problem(model) is None
    for side in ("right", "left"):
        assert worst_error(model, prompt_for(model), side) < 1e-4


def make_mpt():
    torch.manual_seed(0)
    return frozen(T.MptForCausalLM(T.MptConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, vocab_size=V,
                                               pad_token_id=0, eos_token_id=1)))


def make_gpt_neo():
    torch.manual_seed(0)
    return frozen(T.GPTNeoForCausalLM(T.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, window_size=12,
                                                     attention_types=[[["global", "local"], 1]],
                                                     max_position_embeddings=64, vocab_size=V, pad_token_id=0,
                                                     eos_token_id=1, bos_token_id=1)))


@pytest.mark.parametrize(("make", "window"), [(make_mpt, 0), (make_gpt_neo, 12)], ids=["mpt", "gpt_neo"])
def test_left_padded_generation_gives_each_row_what_it_gives_alone(make, window, tmp_path, tokenizer):
    """MPT builds ALiBi from column indices and GPT-Neo's local window (``window_size``, not ``sliding_window``)
    counts columns: the padding a left-padded batch put between a row's prompt and its text changed the row's
    log-probabilities. Such rows now go in batches of one length."""
    from softprompt.engine import Engine, GenerateRequest
    from tests.test_engine import SENT, stored

    model = make()
    assert forward.sliding_window(model) == window
    engine = Engine(model, tokenizer, max_batch_rows=8)
    engine.add_prompt("sent", stored(tmp_path, model, tokenizer, "sent", 3, SENT, 1))
    texts = ["good", "the movie was very bad", "a film"]
    together = engine.generate([GenerateRequest("sent", t, max_tokens=5, logprobs=0) for t in texts])
    for text, got in zip(texts, together, strict=True):
        alone = engine.generate([GenerateRequest("sent", text, max_tokens=5, logprobs=0)])[0]
        assert got.tokens == alone.tokens
        assert [t.logprob for t in got.logprobs] == pytest.approx([t.logprob for t in alone.logprobs], abs=1e-5)


def test_config_fields_that_vary_per_layer_read_as_missing():
    """transformers' heterogeneous configs raise a RuntimeError (not AttributeError) for a per-layer field read
    globally: the window and logit-scaling lookups raised it at load instead of reading the field as absent."""
    from types import SimpleNamespace

    from softprompt.forward.head import LogitOp, candidates
    from softprompt.forward.probe import local_window

    class PerLayer:
        def __getattr__(self, name):
            if name.startswith("get_"):
                raise AttributeError(name)
            raise RuntimeError(f"{name!r} is a per-layer attribute")

    assert local_window(PerLayer()) is None
    assert candidates(SimpleNamespace(config=PerLayer())) == [LogitOp()]
