"""Prompts live in the space the model consumes: its embedding module's output, scaled on Gemma.

Gemma's embedding module multiplies the rows by ``sqrt(hidden_size)`` (5.66 on the tiny model here, 25.3
on Gemma3-270M), so an init read from the raw weight rows starts that many times smaller than the text.
Every check runs on tiny gemma3 and on tiny llama (whose module returns the raw rows) side by side.
"""

from __future__ import annotations

import json

import pytest
import torch

from softprompt import forward
from softprompt.cli import main
from softprompt.config import TrainArgs
from softprompt.embeddings import embedding_rms, token_embeddings, vocab_embeddings
from softprompt.evaluate import evaluate_prompt, hard_prompt_kv
from softprompt.forward import causal
from softprompt.methods import build_method
from softprompt.store import save_prompt
from softprompt.train import train
from tests.conftest import VOCAB, WORD_IDS, make_model, make_tokenizer, text_logits
from tests.test_train import FMT, task

FAMILIES = ["gemma3", "llama"]
INIT_TEXT = "Classify the sentiment of the movie"


def module_out(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(torch.as_tensor(ids)).float()  # (N, H)


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def test_gemma3_scales_in_its_embedding_module():
    """The premise: the tiny gemma3 consumes sqrt(32) x its raw rows, llama its raw rows."""
    ids = list(range(VOCAB))
    gemma, llama = make_model("gemma3"), make_model("llama")
    raw = gemma.get_input_embeddings().weight.detach()
    torch.testing.assert_close(module_out(gemma, ids), raw * 32 ** 0.5)
    assert torch.equal(module_out(llama, ids), llama.get_input_embeddings().weight.detach())
    assert embedding_rms(gemma) == pytest.approx(rms(module_out(gemma, ids)), rel=1e-9)
    assert torch.equal(vocab_embeddings(gemma, chunk_rows=5), module_out(gemma, ids))


@pytest.mark.parametrize("kind", FAMILIES)
def test_text_init_is_the_modules_output(kind, tokenizer):
    model = make_model(kind)
    ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    method = build_method("prompt_tuning", {"num_virtual_tokens": 8, "init": "text", "init_text": INIT_TEXT},
                          model, tokenizer)
    assert torch.equal(method.embeddings.detach(), module_out(model, (ids * 2)[:8]))  # tiled to P


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("init", ["sample_vocab", "class_labels"])
def test_vocabulary_inits_are_the_modules_output(kind, init, tokenizer):
    model = make_model(kind)
    vocab = module_out(model, list(range(len(tokenizer))))  # (V, H)
    method = build_method("prompt_tuning", {"num_virtual_tokens": 6, "init": init}, model, tokenizer,
                          label_texts=["positive", "negative"])
    emb = method.embeddings.detach()  # (6, H)
    if init == "class_labels":  # single-token labels: their rows exactly
        assert torch.equal(emb[:2], module_out(model, [WORD_IDS["positive"], WORD_IDS["negative"]]))
    # every sampled row is some token's module output (not a raw weight row, 5.66x smaller on gemma3)
    assert all(any(torch.equal(row, v) for v in vocab) for row in emb)


def test_random_init_has_the_same_size_relative_to_the_text_on_every_family(tokenizer):
    ratios = {}
    for kind in [*FAMILIES, "gpt2"]:
        model = make_model(kind)
        method = build_method("prompt_tuning", {"num_virtual_tokens": 20, "init": "random", "init_scale": 0.5},
                              model, tokenizer)
        ratios[kind] = rms(method.embeddings.detach()) / rms(module_out(model, list(range(VOCAB))))
    # uniform in +-0.5 RMS units: RMS 0.5 / sqrt(3) = 0.289 of the vocabulary's on every family
    assert ratios["gemma3"] == pytest.approx(ratios["llama"], rel=1e-5)
    assert ratios["gpt2"] == pytest.approx(ratios["llama"], rel=1e-5)
    assert ratios["llama"] == pytest.approx(0.5 / 3 ** 0.5, rel=0.05)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("prompt_pass", ["shared_kv", "concat"])
def test_prompt_goes_in_front_of_the_modules_output_unscaled(kind, prompt_pass):
    """Ours equals HF's inputs_embeds forward of [prompt; module(ids)]: the prompt is not scaled again."""
    model = make_model(kind)
    prompt = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)) * embedding_rms(model)  # (P, H)
    ids = torch.tensor([[3, 15, 12, 17, 8], [3, 16, 13, 18, 11]])  # (B, T)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = text_logits(model, ids, mask, causal.prompt_for_step(model, prompt, prompt_pass))
        embeds = torch.cat([prompt[None].expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
        theirs = model(inputs_embeds=embeds).logits[:, 3:].float()  # (B, T, V)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("source", ["text_init", "hard_prompt"])
def test_text_init_and_hard_prompt_equal_the_text_itself(kind, source, tokenizer):
    """A text-init prompt as long as its text, and the hard-prompt baseline, give the logits of that text."""
    model = make_model(kind)
    init_ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    p = len(init_ids)
    ids = torch.tensor([[3, 15, 12, 17, 8]])
    with torch.no_grad():
        if source == "text_init":
            method = build_method("prompt_tuning", {"num_virtual_tokens": p, "init": "text",
                                                    "init_text": INIT_TEXT}, model, tokenizer)
            prompt = forward.compute_prompt_kv(model, method())
        else:
            prompt = hard_prompt_kv(model, tokenizer, INIT_TEXT)
        plain = model(input_ids=torch.cat([torch.tensor([init_ids]), ids], dim=1)).logits[:, p:].float()
        got = text_logits(model, ids, torch.ones_like(ids), prompt)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
def test_prefix_text_init_is_the_models_own_keys_values(kind, tokenizer):
    model = make_model(kind)
    init_ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    method = build_method("prefix_tuning", {"num_virtual_tokens": len(init_ids), "init": "text",
                                            "init_text": INIT_TEXT}, model, tokenizer)
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([init_ids]), use_cache=True).past_key_values
        for (k, v), layer in zip(method().kv, cache.layers, strict=True):
            torch.testing.assert_close(k, layer.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v, layer.values, atol=1e-5, rtol=1e-4)


def test_inspect_compares_against_the_consumed_vocabulary(tmp_path, capsys):
    """A prompt made of the model's own token embeddings has 1.0x the vocabulary's norm on gemma3."""
    model = make_model("gemma3")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    words = ["good", "bad", "movie", "Paris"]
    method = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "random"}, model, make_tokenizer())
    method.embeddings.data.copy_(token_embeddings(model, [WORD_IDS[w] for w in words]))
    prompt = save_prompt(tmp_path / "p", method, model)
    assert main(["inspect", str(prompt), "--model", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (p,) = report["prompts"]
    assert [t["nearest"][0]["id"] for t in p["tokens"]] == [WORD_IDS[w] for w in words]
    consumed = vocab_embeddings(model)[:len(make_tokenizer())].norm(dim=1)  # the rows a token can be
    assert report["vocab"]["mean_norm"] == pytest.approx(float(consumed.mean()), abs=1e-5)
    expected = float(method.embeddings.detach().norm(dim=1).mean() / consumed.mean())
    assert p["norms"]["ratio"] == pytest.approx(expected, abs=1e-5)
    assert 0.5 < p["norms"]["ratio"] < 2  # raw rows would put it at sqrt(32) = 5.66x


def test_training_reaches_the_same_relative_scale_on_gemma3_as_on_llama(tmp_path, tokenizer):
    """Adafactor (the paper's optimizer, the default) steps in proportion to the prompt's own RMS, so a
    prompt started 5.66x (25x on Gemma3-270M) too small stays small next to the text. From the same text
    init, after the same training, the tuned prompt must have the same size relative to the text on both
    families, and both must have learned."""
    relative, learned = {}, {}
    for kind in FAMILIES:
        model = make_model(kind)
        method = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "text", "init_text": INIT_TEXT},
                              model, tokenizer)
        data = task(n_train=32, n_valid=16)
        val = data.examples("validation")
        with torch.no_grad():
            before, _ = evaluate_prompt(model, tokenizer, forward.compute_prompt_kv(model, method()), val, FMT)
        train(model, tokenizer, method, data, TrainArgs(output_dir=str(tmp_path / kind), max_steps=24,
                                                        batch_size=8, lr=0.3, warmup_steps=2, eval_every=24,
                                                        checkpoint_every=100, seed=3))
        with torch.no_grad():
            after, _ = evaluate_prompt(model, tokenizer, forward.compute_prompt_kv(model, method()), val, FMT)
        text = module_out(model, list(range(3, 32))).norm(dim=1).mean()
        relative[kind] = float(method.embeddings.detach().norm(dim=1).mean() / text)
        learned[kind] = before["loss"] - after["loss"]
    assert all(d > 0.05 for d in learned.values()), learned
    assert 0.5 < relative["gemma3"] / relative["llama"] < 2, relative  # raw-row init: 0.28
