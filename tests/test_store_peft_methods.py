"""PEFT interop for P-tuning, prefix tuning and deep prompts on the tiny llama, gpt2 and qwen2 models.

Both directions, with equal text logits: folders PEFT itself writes (``get_peft_model`` +
``save_pretrained``) load in ours, and folders we export load in ``PeftModel.from_pretrained``. PEFT
stores what its prompt encoder produces (P-tuning: the ``(P, H)`` embeddings after the MLP or LSTM; prefix
tuning: the ``(P, layers*2*kv_dim)`` prefix after the projection MLP, if any), as we do, so every variant
is representable both ways.
"""

from __future__ import annotations

import pytest
import torch

from softprompt.forward import compute_prompt_kv
from softprompt.methods import PromptMethod, build_method
from softprompt.store import export_peft, load_prompt, save_prompt
from tests.conftest import ARCHS, VOCAB, make_model, make_tokenizer, text_logits

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")]  # PEFT's prefix call

P, B, T = 4, 2, 6


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(7))  # (B, T), no padding
    return ids, torch.ones_like(ids)


@torch.no_grad()
def our_logits(base, method: PromptMethod | None) -> torch.Tensor:
    ids, mask = inputs()
    return text_logits(base, ids, mask, None if method is None else compute_prompt_kv(base, method()))  # (B, T, V)


@torch.no_grad()
def peft_logits(peft_model) -> torch.Tensor:
    """The text positions' logits (P-tuning returns the virtual tokens' too, in front; prefix tuning does not)."""
    ids, mask = inputs()
    peft_model.eval()
    return peft_model(input_ids=ids, attention_mask=mask).logits[:, -T:].float()  # (B, T, V)


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor, base) -> None:
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert (ours - our_logits(base, None)).abs().max() > 1e-2  # the prompt changes the logits


PEFT_CONFIGS = {
    "p_tuning_mlp": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                     encoder_reparameterization_type="MLP",
                                                     encoder_hidden_size=16),
    "p_tuning_lstm": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                      encoder_reparameterization_type="LSTM",
                                                      encoder_hidden_size=16),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "prefix_projection": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                         prefix_projection=True, encoder_hidden_size=16),
}
EXPECTED = {"p_tuning_mlp": ("p_tuning", {"encoder": "mlp"}), "p_tuning_lstm": ("p_tuning", {"encoder": "lstm"}),
            "prefix": ("prefix_tuning", {}), "prefix_projection": ("prefix_tuning", {})}


@pytest.mark.parametrize("variant", list(PEFT_CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_written_folder_loads_with_peft_logits(arch, variant, tmp_path):
    torch.manual_seed(5)  # PEFT's own random init of its encoder (MLP / LSTM / projection) and embeddings
    peft_model = peft.get_peft_model(make_model(arch), PEFT_CONFIGS[variant]())
    peft_model.save_pretrained(tmp_path / "peft")

    base = make_model(arch)
    stored = load_prompt(tmp_path / "peft", model=base)
    method, config = EXPECTED[variant]
    assert stored.method == method and stored.method_config["num_virtual_tokens"] == P
    assert config.items() <= stored.method_config.items()
    assert_same_logits(our_logits(base, stored.build_method()), peft_logits(peft_model), base)


def perturbed(method: PromptMethod) -> PromptMethod:
    """Move every trainable tensor (a fresh projection MLP starts as a constant map) by seeded noise."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return method.eval()


OUR_CONFIGS = {
    "deep_prompt": ("deep_prompt", {"num_virtual_tokens": P, "init": "random", "init_scale": 1.0}),
    "p_tuning_lstm": ("p_tuning", {"num_virtual_tokens": P, "encoder": "lstm", "init_scale": 1.0}),
    "prefix_projection": ("prefix_tuning", {"num_virtual_tokens": P, "projection": True, "init": "random",
                                            "init_scale": 1.0}),
}


@pytest.mark.parametrize("variant", list(OUR_CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_our_export_loads_in_peft_with_our_logits(arch, variant, tmp_path):
    base = make_model(arch)
    name, config = OUR_CONFIGS[variant]
    method = perturbed(build_method(name, config, base, make_tokenizer()))
    folder = save_prompt(tmp_path / "ours", method, base)
    dst = export_peft(folder, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(make_model(arch), dst)
    assert peft_model.peft_config["default"].peft_type.value == ("P_TUNING" if name == "p_tuning"
                                                                 else "PREFIX_TUNING")
    assert_same_logits(our_logits(base, method), peft_logits(peft_model), base)


def make_opt350_like():
    """A tiny OPT whose embeddings (16) are narrower than its attention (32), as OPT-350m's (512 vs 1024)."""
    from transformers import OPTConfig, OPTForCausalLM

    from softprompt.model import prepare_frozen

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                     pad_token_id=0, bos_token_id=None, eos_token_id=1))
    prepare_frozen(model)
    return model


def test_a_prefix_on_a_model_with_narrower_embeddings_than_attention_matches_peft_both_ways(tmp_path):
    # the head size was read from the embedding width (16 // 4 = 4, not 32 // 4 = 8): our prefix crashed in the
    # model's cache, and a PEFT-written folder was refused (token_dim 64, "the model has 32")
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(make_opt350_like(), PEFT_CONFIGS["prefix"]())
    with torch.no_grad():  # PEFT's prefix starts near zero; move it so that it changes the logits
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    base = make_opt350_like()
    stored = load_prompt(tmp_path / "peft", model=base)
    assert (stored.method_config["kv_heads"], stored.method_config["head_dim"]) == (4, 8)
    assert_same_logits(our_logits(base, stored.build_method()), peft_logits(peft_model), base)

    method = perturbed(build_method("deep_prompt", OUR_CONFIGS["deep_prompt"][1], base, make_tokenizer()))
    dst = export_peft(save_prompt(tmp_path / "ours", method, base), tmp_path / "exported")
    assert_same_logits(our_logits(base, method), peft_logits(peft.PeftModel.from_pretrained(make_opt350_like(), dst)),
                       base)


def make_composite():
    """A tiny Gemma 3 vision-language model: its sizes are under ``config.text_config`` (as
    ``AutoModelForCausalLM`` loads gemma-3-4b and larger)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from softprompt.model import prepare_frozen

    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, pad_token_id=0,
                bos_token_id=None, eos_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                        image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2,
                                                        eoi_token_index=VOCAB - 3))
    prepare_frozen(model)
    return model


def test_a_composite_config_gives_the_text_models_geometry_as_peft_reads_it():
    # the sizes were read from the top-level config, which has none: ZeroDivisionError for a prefix, and
    # num_layers / num_attention_heads 0 in an exported adapter_config.json
    from softprompt.methods import PrefixTuning, method_from_saved
    from softprompt.methods.prefix_tuning import kv_geometry

    base = make_composite()
    assert kv_geometry(base) == (2, 2, 16)
    keys = ("token_dim", "num_layers", "num_attention_heads")
    peft_prefix = peft.get_peft_model(make_composite(), PEFT_CONFIGS["prefix"]()).peft_config["default"]
    assert PrefixTuning.peft_token_dim(base) == peft_prefix.token_dim
    prefix = method_from_saved("prefix_tuning", {"num_virtual_tokens": P, "num_layers": 2, "kv_heads": 2,
                                                 "head_dim": 16}, {"prompt_embeddings": torch.zeros(P, 2 * 2 * 32)})
    assert {k: prefix.peft_config(base)[k] for k in keys} == {k: getattr(peft_prefix, k) for k in keys}
    for name, peft_config in (("prompt_tuning", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
                              ("p_tuning", PEFT_CONFIGS["p_tuning_mlp"]())):
        theirs = peft.get_peft_model(make_composite(), peft_config).peft_config["default"]
        ours = build_method(name, {"num_virtual_tokens": P, **({"init": "random"} if name != "p_tuning" else {})},
                            base, make_tokenizer()).peft_config(base)
        assert {k: ours[k] for k in keys} == {k: getattr(theirs, k) for k in keys}, name
