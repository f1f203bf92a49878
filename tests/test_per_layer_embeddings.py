"""Decoders with per-layer embeddings and layers that reuse earlier layers' keys/values (Gemma 3n, Gemma 4
E2B/E4B): a prompt in front of the text trains, caches and serves as the model's own forward computes it.

Such a decoder also reads, in every layer, an embedding of each position's token id. From ``inputs_embeds`` alone
it recovers the ids by matching its embedding rows, which a prompt's rows match none of, so every prompt was
refused. The prompt positions now read the pad token's per-layer embedding, as transformers gives the image and
audio positions of these models. From some depth on, a layer attends to the keys/values of the last earlier
layer of its type; its cache slot holds nothing, and a cached prompt keeps the source layer's there.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3nForCausalLM,
    Gemma3nTextConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
)

from softprompt.data import Encoded, collate
from softprompt.forward import causal, logits_from_hidden
from softprompt.forward.common import shared_kv_sources, text_decoder
from softprompt.forward.probe import probed
from softprompt.forward.slots import check_slots
from softprompt.model import prepare_frozen
from tests.conftest import VOCAB
from tests.test_engine import CAPS, SENT

IDS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]


def make_gemma4_e2b(shared: int = 2, composite: bool = False):
    """A tiny Gemma 4 with per-layer embeddings; its last ``shared`` layers reuse earlier layers' keys/values.
    ``composite``: as the E2B/E4B checkpoints load, a ``Gemma4ForConditionalGeneration`` around it."""
    torch.manual_seed(0)
    cfg = Gemma4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=8,
                           sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 2,
                           vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
                           num_kv_shared_layers=shared, max_position_embeddings=256, pad_token_id=0,
                           bos_token_id=None, eos_token_id=1)
    if composite:  # no vision or audio tower; special token ids within the tiny vocabulary
        cfg = Gemma4Config(text_config=cfg.to_dict(), vision_config=None, audio_config=None, boi_token_id=60,
                           eoi_token_id=61, image_token_id=62, video_token_id=63, boa_token_id=59,
                           eoa_token_index=58, audio_token_id=57)
    model = Gemma4ForConditionalGeneration(cfg) if composite else Gemma4ForCausalLM(cfg)
    prepare_frozen(model)
    return model.eval()


def make_gemma3n():
    """A tiny Gemma 3n (per-layer embeddings, AltUp, LAuReL; its last 2 layers reuse keys/values)."""
    torch.manual_seed(0)
    cfg = Gemma3nTextConfig(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            hidden_size_per_layer_input=8, sliding_window=128,
                            layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                            laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4,
                            max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    model = Gemma3nForCausalLM(cfg)
    prepare_frozen(model)
    return model.eval()


def prompt_for(model, p: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    emb = model.get_input_embeddings()
    return torch.randn(p, emb.weight.shape[1], generator=gen) * float(emb(torch.arange(10)).std())


def reference_logits(model, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """transformers' own forward of one row ``[prompt, text]``, the prompt positions' per-layer embeddings the
    pad token's: ``(T, V)`` at the text positions."""
    p = prompt.shape[0]
    embeds = torch.cat([prompt[None], model.get_input_embeddings()(torch.tensor([ids]))], 1)
    pad = model.config.get_text_config().pad_token_id
    per_layer = text_decoder(model).get_per_layer_inputs(torch.tensor([[pad] * p + ids]))
    with torch.no_grad():
        return model(inputs_embeds=embeds, per_layer_inputs=per_layer).logits[0, p:].float()


def run_together(engine, reqs) -> dict:
    """``reqs`` generated together in the running batch (slot attention): ``{index: result}``."""
    from softprompt.engine.running import RunningBatch

    batch, running = RunningBatch(engine), {}
    for i, req in enumerate(reqs):
        batch.admit(engine.prepare("generate", req), done=lambda res, i=i: running.__setitem__(i, res))
    while len(batch):
        batch.step()
    return running


@pytest.mark.parametrize(("make", "shared"), [
    (lambda: make_gemma4_e2b(0), False), (make_gemma4_e2b, True), (lambda: make_gemma4_e2b(composite=True), True),
    (make_gemma3n, True)], ids=["gemma4-ple", "gemma4-ple-shared-kv", "gemma4-composite", "gemma3n"])
def test_prompt_paths_equal_the_models_own_forward(make, shared):
    model = make()
    assert probed(model).cached is None and probed(model).concat is None
    assert shared_kv_sources(model) == ({2: 0, 3: 1} if shared else {})
    prompt = prompt_for(model)
    for side in ("right", "left"):
        batch = collate([Encoded(r, len(r)) for r in IDS], 0, side)
        for cached in (True, False):
            with torch.no_grad():
                kv = causal.compute_prompt_kv(model, prompt) if cached else prompt
                logits = logits_from_hidden(model, causal.final_hidden(model, batch.input_ids, batch.attention_mask,
                                                                       kv))
            for i, row in enumerate(IDS):
                got = logits[i][batch.attention_mask[i].bool()]
                assert (got - reference_logits(model, prompt, row)).abs().max() < 1e-4, (side, cached)
    if shared:  # a reusing layer's cached prompt is its source's keys/values
        with torch.no_grad():
            kv = causal.compute_prompt_kv(model, prompt)
        assert kv.layers[2][0] is kv.layers[0][0] and kv.layers[3][1] is kv.layers[1][1]


def test_both_training_passes_give_the_same_gradient():
    from tests.test_families import pass_gradients

    model = make_gemma4_e2b()
    grads = pass_gradients(model, prompt_for(model))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5)


def test_the_engine_serves_it_as_the_reference_computes(tmp_path, tokenizer):
    from softprompt.engine import ClassifyRequest, GenerateRequest
    from tests.test_engine import ids_of
    from tests.test_families import engine_with_prompts

    model = make_gemma4_e2b()
    assert check_slots(model) is None  # the running batch's slot attention agrees with the model
    engine, embeds = engine_with_prompts(model, tokenizer, tmp_path)
    texts = ["the movie was great", "a bad plot"]
    for text, res in zip(texts, engine.classify([ClassifyRequest("sent", t) for t in texts]), strict=True):
        src = ids_of(tokenizer, SENT["template"].format(text=text))
        ref = {}
        for label, verbal in SENT["verbalizer"].items():
            ids = src + ids_of(tokenizer, " " + verbal)
            logp = torch.log_softmax(reference_logits(model, embeds["sent"], ids), -1)
            ref[label] = float(sum(logp[t - 1, ids[t]] for t in range(len(src), len(ids))))
        assert res.scores == pytest.approx(ref, abs=1e-4)
    reqs = [GenerateRequest("caps", {"country": c}, max_tokens=4) for c in ["France", "Spain"]]
    running = run_together(engine, reqs)
    for i, (req, res) in enumerate(zip(reqs, engine.generate(reqs), strict=True)):
        ids = ids_of(tokenizer, CAPS["template"].format(**req.input))
        n = len(ids)
        for _ in range(4):
            nxt = int(reference_logits(model, embeds["caps"], ids)[-1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            ids.append(nxt)
        assert res.tokens == ids[n:] and running[i].tokens == ids[n:]


def test_a_prefix_on_layers_that_reuse_keys_values_is_read_from_their_source(tmp_path, tokenizer):
    """The model's reusing layers attend to their source layer's keys/values, prefix included; the running
    batch's slot attention read the reusing layer's own prefix, which the model never reads."""
    from softprompt.engine import Engine, GenerateRequest
    from softprompt.methods import build_method
    from softprompt.store import load_prompt, save_prompt

    model = make_gemma3n()
    torch.manual_seed(4)
    method = build_method("prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, model, tokenizer)
    with torch.no_grad():
        for param in method.parameters():
            param.normal_(0, 1.0)
        kv = causal.compute_prompt_kv(model, method())
    assert kv.layers[2][0] is kv.layers[0][0] and kv.layers[3][1] is kv.layers[1][1]
    save_prompt(tmp_path / "caps", method, model, task=CAPS)
    engine = Engine(model, tokenizer, max_batch_rows=4)
    engine.add_prompt("caps", load_prompt(tmp_path / "caps", model))
    reqs = [GenerateRequest("caps", {"country": c}, max_tokens=6) for c in ["France", "Spain"]]
    running = run_together(engine, reqs)
    engine.backend._slots_problem = "off: the reference is the cache path"
    for i, res in enumerate(engine.generate(reqs)):
        assert running[i].tokens == res.tokens


def test_the_prompt_table_keeps_and_gathers_reused_keys_values_once():
    """A layer that reuses an earlier layer's keys/values holds that layer's tensors in every cached prompt; the
    table stacked and gathered a copy for each layer (a third more memory on Gemma 3n E2B, 10 of 30 layers).
    Now the reusing layers share their source's stacked and gathered tensors, and a mixed batch still computes
    what each prompt alone does."""
    from softprompt.engine import PromptTable

    model = make_gemma3n()
    kvs = {name: causal.compute_prompt_kv(model, prompt_for(model, p)) for name, p in (("a", 3), ("b", 5))}
    table = PromptTable()
    for name, kv in kvs.items():
        table.add(name, kv)
    sources = shared_kv_sources(model)
    assert sources == {2: 0, 3: 1}
    ks, vs, _, _ = table._stack()
    mixed = table.rows(["a", "b", None])
    for layer, source in sources.items():
        assert ks[layer] is ks[source] and vs[layer] is vs[source]
        assert mixed.layers[layer][0] is mixed.layers[source][0] and mixed.layers[layer][1] is mixed.layers[source][1]
    assert len({t.data_ptr() for t in ks + vs}) == 2 * (len(ks) - len(sources))
    ids = torch.tensor([IDS[0][:5], IDS[2][:5], IDS[0][:5]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = causal.final_hidden(model, ids, mask, mixed)
        for row, key in enumerate(["a", "b", None]):
            alone = causal.final_hidden(model, ids[row:row + 1], mask[row:row + 1], kvs.get(key))
            torch.testing.assert_close(got[row], alone[0], atol=1e-5, rtol=1e-4)
