"""PEFT interop both ways: our prompts load in PEFT, PEFT prompts load in ours, with equal logits.

PEFT prepends the virtual tokens to ``inputs_embeds``; we feed the prompt as cached keys/values. On
unpadded inputs both give the text tokens positions ``P..P+T-1``, so the text logits must agree.
PEFT wraps the base model it is given, so each side gets its own base model built from the same seed.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from softprompt.forward import compute_prompt_kv
from softprompt.methods import PromptMethod, build_method
from softprompt.model import fingerprint, prepare_frozen
from softprompt.store import (
    CONFIG_NAME,
    META_NAME,
    WEIGHTS_NAME,
    StoreError,
    export_peft,
    import_peft,
    load_prompt,
    save_prompt,
)
from tests.conftest import text_logits

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

P, B, T = 4, 2, 6
# what PEFT 0.21 writes for a causal-LM prompt-tuning config (plus peft_version)
PEFT_CONFIG_KEYS = {"auto_mapping", "base_model_name_or_path", "inference_mode", "modules_to_save",
                    "num_attention_heads", "num_layers", "num_transformer_submodules", "num_virtual_tokens",
                    "peft_type", "prompt_tuning_init", "prompt_tuning_init_text", "revision", "task_type",
                    "token_dim", "tokenizer_kwargs", "tokenizer_name_or_path"}


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2))
    elif arch == "gemma3":  # its embedding module scales the rows by sqrt(32): PEFT prepends to that output
        model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=8, query_pre_attn_scalar=8, sliding_window=64,
                                                   layer_types=["sliding_attention", "full_attention"]))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    prepare_frozen(model)
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(7))  # (B, T), no padding
    return ids, torch.ones_like(ids)


@torch.no_grad()
def our_logits(base, method: PromptMethod) -> torch.Tensor:
    ids, mask = inputs()
    return text_logits(base, ids, mask, compute_prompt_kv(base, method()))  # (B, T, V)


@torch.no_grad()
def no_prompt_logits(base) -> torch.Tensor:
    ids, mask = inputs()
    return text_logits(base, ids, mask)  # (B, T, V)


@torch.no_grad()
def peft_logits(peft_model) -> torch.Tensor:
    ids, mask = inputs()
    logits = peft_model(input_ids=ids, attention_mask=mask).logits  # (B, P+T, V): virtual tokens first
    assert logits.shape[1] == P + T
    return logits[:, P:].float()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fresh_base_models_are_identical(arch):
    a, b = tiny_model(arch).state_dict(), tiny_model(arch).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fingerprint(tiny_model(arch)) == fingerprint(tiny_model(arch))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_ours_to_peft(arch, tmp_path):
    base = tiny_model(arch)
    method = build_method("prompt_tuning", {"num_virtual_tokens": P, "init": "random", "seed": 3}, base,
                          tokenizer=None)
    ours = save_prompt(tmp_path / "ours", method, base, task={"template": "{text}"})
    dst = export_peft(ours, tmp_path / "peft")
    assert sorted(p.name for p in dst.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (dst / WEIGHTS_NAME).read_bytes() == (ours / WEIGHTS_NAME).read_bytes()
    assert json.loads((dst / CONFIG_NAME).read_text()) == json.loads((ours / CONFIG_NAME).read_text())

    peft_model = peft.PeftModel.from_pretrained(tiny_model(arch), dst)
    peft_model.eval()
    loaded = peft_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(loaded, method.embeddings.detach())  # PEFT's own init was overwritten
    torch.testing.assert_close(peft_logits(peft_model), our_logits(base, method), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(our_logits(base, method), no_prompt_logits(base), atol=1e-3)  # prompt matters
    # PEFT also reads our full folder (it ignores softprompt.json)
    again = peft.PeftModel.from_pretrained(tiny_model(arch), ours)
    assert torch.equal(again.prompt_encoder["default"].embedding.weight, loaded)


def peft_prompt_folder(arch: str, folder, **config):
    """Save a PEFT prompt with seeded non-trivial weights; return the PEFT model and those weights."""
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **config)
    peft_model = peft.get_peft_model(tiny_model(arch), cfg)
    weight = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(11)))
    peft_model.save_pretrained(folder)
    return peft_model, weight.detach().clone()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_peft_to_ours(arch, tmp_path):
    peft_model, weight = peft_prompt_folder(arch, tmp_path / "peft", prompt_tuning_init="RANDOM")
    written = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert set(written) - {"peft_version"} == PEFT_CONFIG_KEYS
    assert written["peft_type"] == "PROMPT_TUNING" and written["num_virtual_tokens"] == P
    assert written["token_dim"] == 32 and written["num_transformer_submodules"] == 1
    with safetensors.safe_open(tmp_path / "peft" / WEIGHTS_NAME, "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"] and f.metadata() == {"format": "pt"}

    base = tiny_model(arch)
    direct = load_prompt(tmp_path / "peft", model=base)  # a plain PEFT folder: no softprompt.json
    assert direct.method == "prompt_tuning" and direct.meta == {} and direct.fingerprint is None
    assert direct.method_config == {"num_virtual_tokens": P, "init": "random"}

    ours = import_peft(tmp_path / "peft", tmp_path / "ours", base, task={"template": "{text}"})
    stored = load_prompt(ours, model=base)
    assert stored.fingerprint == fingerprint(base) and stored.task["template"] == "{text}"
    assert json.loads((ours / META_NAME).read_text())["method"] == "prompt_tuning"
    method = stored.build_method()
    assert torch.equal(method.embeddings.detach(), weight)
    peft_model.eval()
    torch.testing.assert_close(peft_logits(peft_model), our_logits(base, method), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(our_logits(base, method), no_prompt_logits(base), atol=1e-3)  # prompt matters
    torch.testing.assert_close(our_logits(base, direct.build_method()), our_logits(base, method),
                               rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_text_init_equals_peft_text_init(arch, tmp_path):
    """PEFT's TEXT init calls the embedding module (scaled on Gemma); ours starts from the same prompt."""
    from tests.conftest import make_tokenizer

    make_tokenizer().save_pretrained(tmp_path / "tok")
    text = "Classify the sentiment"  # 3 tokens, tiled to P
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path / "tok"))
    peft_model = peft.get_peft_model(tiny_model(arch), cfg)
    base = tiny_model(arch)
    assert peft_model.word_embeddings is peft_model.get_base_model().get_input_embeddings()
    ours = build_method("prompt_tuning", {"num_virtual_tokens": P, "init": "text", "init_text": text}, base,
                        make_tokenizer())
    assert torch.equal(ours.embeddings.detach(), peft_model.prompt_encoder["default"].embedding.weight.detach())
    peft_model.eval()
    torch.testing.assert_close(peft_logits(peft_model), our_logits(base, ours), atol=1e-5, rtol=1e-4)


def test_import_maps_text_init(tmp_path):
    """TEXT init keeps its text; PEFT needs a tokenizer for it, so write the config by hand."""
    folder = tmp_path / "peft"
    peft_prompt_folder("llama", folder, prompt_tuning_init="RANDOM")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    for init, text, expected in [("TEXT", "Is it good?", {"init": "text", "init_text": "Is it good?"}),
                                 ("TEXT", None, {"init": "random"}),
                                 ("SAMPLE_VOCAB", None, {"init": "sample_vocab"}),
                                 ("SOMETHING_NEW", None, {"init": "random"})]:
        (folder / CONFIG_NAME).write_text(json.dumps({**cfg, "prompt_tuning_init": init,
                                                      "prompt_tuning_init_text": text}))
        assert load_prompt(folder).method_config == {"num_virtual_tokens": P, **expected}


def test_import_refuses_mismatched_model(tmp_path):
    peft_prompt_folder("llama", tmp_path / "peft", prompt_tuning_init="RANDOM")
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(StoreError, match="token_dim 32 but the model .* hidden size 48"):
        import_peft(tmp_path / "peft", tmp_path / "ours", wide)
    assert not (tmp_path / "ours").exists()


def test_export_refuses_existing_and_pickle(tmp_path):
    base = tiny_model("llama")
    method = build_method("prompt_tuning", {"num_virtual_tokens": P, "init": "random"}, base, tokenizer=None)
    ours = save_prompt(tmp_path / "ours", method, base)
    export_peft(ours, tmp_path / "peft")
    with pytest.raises(StoreError, match="already exists"):
        export_peft(ours, tmp_path / "peft")
    export_peft(ours, tmp_path / "peft", overwrite=True)
    (tmp_path / "peft" / WEIGHTS_NAME).unlink()
    (tmp_path / "peft" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(StoreError, match="pickle weights are refused"):
        import_peft(tmp_path / "peft", tmp_path / "again", base)
