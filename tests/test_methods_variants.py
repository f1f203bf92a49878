"""Prefix tuning, deep prompts and P-tuning: training, storing, PEFT interop, serving mixed with prompt tuning."""

from __future__ import annotations

import pytest
import torch

from softprompt import forward
from softprompt.config import TrainArgs
from softprompt.engine import ClassifyRequest, Engine
from softprompt.methods import build_method
from softprompt.store import export_peft, load_prompt, save_prompt
from softprompt.train import train
from tests.conftest import make_model, text_logits
from tests.test_train import FMT, task

VARIANTS = [("prefix_tuning", {"num_virtual_tokens": 4, "init": "text", "init_text": "Classify the sentiment ."}),
            ("prefix_tuning", {"num_virtual_tokens": 4, "init": "random", "projection": True,
                               "encoder_hidden_size": 16}),
            ("deep_prompt", {"num_virtual_tokens": 3, "init": "random", "init_scale": 0.5}),
            ("p_tuning", {"num_virtual_tokens": 4, "encoder": "mlp"}),
            ("p_tuning", {"num_virtual_tokens": 4, "encoder": "lstm", "encoder_hidden_size": 16})]
IDS = ["prefix_text", "prefix_mlp", "deep", "ptune_mlp", "ptune_lstm"]
SENT = {"template": FMT.template, "target_field": "label", "verbalizer": FMT.verbalizer}


def batch():
    from softprompt.data import Encoded, collate

    return collate([Encoded([5, 6, 7, 8, 9], 4), Encoded([10, 11, 12], 2)], 0)


@pytest.mark.parametrize(("name", "cfg"), VARIANTS, ids=IDS)
def test_variant_trains_saves_and_loads_back_identically(arch_model, tokenizer, tmp_path, name, cfg):
    method = build_method(name, cfg, arch_model, tokenizer)
    base = [p.detach().clone() for p in arch_model.parameters()]
    start = method.saved_tensors()["prompt_embeddings"].clone()
    train(arch_model, tokenizer, method, task(n_train=32, n_valid=8),
          TrainArgs(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=8, eval_every=4, optimizer="adamw",
                    lr=0.05, seed=0))
    assert not torch.equal(start, method.saved_tensors()["prompt_embeddings"])
    assert all(torch.equal(a, b) for a, b in zip(base, arch_model.parameters(), strict=True))  # frozen
    method.eval()
    b = batch()
    with torch.no_grad():
        before = text_logits(arch_model, b.input_ids, b.attention_mask, forward.compute_prompt_kv(arch_model,
                                                                                                       method()))
    save_prompt(tmp_path / "p", method, arch_model, task=SENT)
    stored = load_prompt(tmp_path / "p", arch_model)
    assert stored.method == name
    with torch.no_grad():
        again = text_logits(arch_model, b.input_ids, b.attention_mask,
                                   forward.compute_prompt_kv(arch_model, stored.build_method().eval()()))
    torch.testing.assert_close(again, before, atol=1e-5, rtol=1e-5)  # any MLP/LSTM was folded exactly


@pytest.mark.parametrize(("name", "cfg"), [VARIANTS[0], VARIANTS[3]], ids=["prefix", "ptuning"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_loads_exported_variant_with_identical_logits(tokenizer, tmp_path, name, cfg, kind):
    peft = pytest.importorskip("peft")
    model = make_model(kind)
    method = build_method(name, cfg, model, tokenizer).eval()
    save_prompt(tmp_path / "ours", method, model)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(make_model(kind), tmp_path / "peft")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    p = cfg["num_virtual_tokens"]
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
        theirs = theirs[:, -ids.shape[1]:] if theirs.shape[1] > ids.shape[1] else theirs
        ours = text_logits(model, ids, mask, forward.compute_prompt_kv(model, method()))
    assert theirs.shape == ours.shape, (theirs.shape, p)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_engine_serves_all_methods_mixed_in_one_batch(tokenizer, tmp_path):
    model = make_model("qwen2")
    engine = Engine(model, tokenizer, max_batch_rows=8)
    singles = {}
    all_cfgs = [("prompt_tuning", {"num_virtual_tokens": 5, "init": "random"}), *VARIANTS]
    for i, (name, cfg) in enumerate(all_cfgs):
        method = build_method(name, cfg, model, tokenizer)
        save_prompt(tmp_path / f"m{i}", method, model, task=SENT)
        engine.add_prompt(f"m{i}", load_prompt(tmp_path / f"m{i}", model))
    texts = ["good movie", "the plot was awful"]
    for i in range(len(all_cfgs)):  # each alone
        singles[i] = engine.classify([ClassifyRequest(f"m{i}", t) for t in texts])
    mixed = engine.classify([ClassifyRequest(f"m{i}", t) for t in texts for i in range(len(all_cfgs))])
    for k, res in enumerate(mixed):
        t, i = divmod(k, len(all_cfgs))
        assert res.scores == pytest.approx(singles[i][t].scores, abs=1e-5)


def test_prefix_refused_for_a_model_with_other_geometry(tokenizer, tmp_path):
    from softprompt.store import StoreError

    method = build_method("prefix_tuning", {"num_virtual_tokens": 2, "init": "random"}, make_model("llama"), tokenizer)
    save_prompt(tmp_path / "p", method, make_model("llama"))
    with pytest.raises(StoreError, match="token_dim|num_layers|different base model"):
        load_prompt(tmp_path / "p", make_model("gpt2"))


@pytest.mark.parametrize(("name", "cfg"), [VARIANTS[1], VARIANTS[3]], ids=["prefix_mlp", "ptuning"])
def test_a_projection_is_built_from_the_config_seed_alone(tokenizer, name, cfg):
    """Prefix tuning's MLP drew its layers from the global RNG, unseeded (unlike P-tuning's encoder): one tune
    trial's init depended on what ran before it, and train could not rebuild a trial's. The same config gives the
    same weights whatever the global RNG, another seed other ones."""
    model = make_model("llama")
    built = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 5)):
        torch.manual_seed(global_seed)
        built.append(build_method(name, {**cfg, "seed": seed}, model, tokenizer).state_dict())
    assert built[0].keys() == built[1].keys() and any("mlp" in k or "head" in k for k in built[0])
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0])
    assert not all(torch.equal(built[0][k], built[2][k]) for k in built[0])
