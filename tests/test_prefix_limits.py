"""Where a key/value prefix (prefix_tuning, deep_prompt) cannot work, it is refused up front with a clear error."""

from __future__ import annotations

import re

import pytest
import torch

from softprompt.config import ConfigError, TrainArgs
from softprompt.methods import build_method
from softprompt.train import train
from tests import test_cli
from tests.conftest import VOCAB, make_model
from tests.test_cli import _assert_usage_error, train_argv
from tests.test_train import task

env = test_cli.env  # the tiny model folders and jsonl files (a module fixture)


def _no_model(monkeypatch):
    """Make loading the model fail loudly: a refusal must come before it."""
    import softprompt.workflows.distilling as distilling
    import softprompt.workflows.training as training
    import softprompt.workflows.tuning as tuning

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the arguments were not refused up front")

    for module in (training, tuning, distilling):
        monkeypatch.setattr(module, "load_model_from_args", refuse)


@pytest.mark.parametrize("method", ["prefix_tuning", "deep_prompt"])
def test_train_refuses_a_prefix_with_gradient_checkpointing_before_the_model_loads(env, tmp_path, monkeypatch,
                                                                                     method):
    # transformers sets cache=None inside a checkpointed layer, and the prefix is that cache: the run crashed at
    # its first step with "The size of tensor a (7) must match the size of tensor b (11)"
    _no_model(monkeypatch)
    _assert_usage_error(train_argv(env, tmp_path / "o", "--method", method, "--gradient-checkpointing"),
                        f"--method {method} cannot train with --gradient-checkpointing",
                        "transformers drops that cache inside a checkpointed layer")
    assert not (tmp_path / "o").exists()


def test_tune_and_distill_refuse_a_prefix_with_gradient_checkpointing_before_the_model_loads(env, tmp_path,
                                                                                            monkeypatch):
    _no_model(monkeypatch)
    tune = ["tune", *train_argv(env, tmp_path / "t", "--gradient-checkpointing")[1:]]
    _assert_usage_error([*tune, "--method", "deep_prompt"], "--method deep_prompt cannot train with "
                        "--gradient-checkpointing")
    err = _assert_usage_error([*tune, "--search", "method=prefix_tuning,deep_prompt"], "no valid combination",
                              "--method prefix_tuning cannot train with --gradient-checkpointing")
    assert "--method deep_prompt cannot train" in err
    _assert_usage_error(["distill", "--model", env["model"], "--context", "a good movie", "--sample-inputs", "4",
                         "--method", "prefix_tuning", "--gradient-checkpointing", "--output-dir", tmp_path / "d"],
                        "--method prefix_tuning cannot train with --gradient-checkpointing")
    assert not (tmp_path / "d").exists()


def test_a_search_drops_prefix_trials_under_gradient_checkpointing_with_a_note():
    from softprompt.config import PromptArgs
    from softprompt.tune import TuneArgs, trial_specs

    specs, notes = trial_specs(TuneArgs(lrs=[0.1], search={"method": ["prompt_tuning", "prefix_tuning"]}),
                               PromptArgs(init="random"), TrainArgs(gradient_checkpointing=True))
    assert {s.method for s in specs} == {"prompt_tuning"}
    assert any("--method prefix_tuning cannot train with --gradient-checkpointing" in n for n in notes)


def test_train_refuses_a_prefix_with_gradient_checkpointing(tmp_path, tokenizer):
    model = make_model("llama")
    method = build_method("deep_prompt", {"num_virtual_tokens": 4, "init": "random"}, model, tokenizer)
    with pytest.raises(ConfigError, match="--method deep_prompt cannot train with --gradient-checkpointing"):
        train(model, tokenizer, method, task(), TrainArgs(output_dir=str(tmp_path / "o"), max_steps=2,
                                                          gradient_checkpointing=True))
    assert not (tmp_path / "o").exists() and not model.is_activation_checkpointing


def make_gemma4():
    """A tiny Gemma 4: its sliding layers' heads (8) are smaller than its full layers' (16); no per-layer inputs
    (tests/test_per_layer_embeddings.py has them)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from softprompt.model import prepare_frozen

    torch.manual_seed(0)
    cfg = Gemma4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                           vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                           max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    model = Gemma4ForCausalLM(cfg)
    prepare_frozen(model)
    return model


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_a_model_whose_attention_differs_by_layer_refuses_a_prefix_and_a_store_serves_the_rest(tmp_path, tokenizer):
    # transformers' AmbiguousGlobalPerLayerAttributeError (a RuntimeError) escaped building a prefix, and aborted
    # Engine.from_store(skip_broken=True) at the first PEFT prefix folder in the store
    peft = pytest.importorskip("peft")
    from softprompt.engine import Engine
    from softprompt.store import PromptStore, StoreError

    with pytest.raises(ValueError, match=r"differs by layer \(key/value heads x head size per layer: "
                                         r"\[\(2, 8\), \(2, 16\)\]\); use prompt_tuning or p_tuning"):
        build_method("prefix_tuning", {"num_virtual_tokens": 4, "init": "random"}, make_gemma4(), tokenizer)
    store = PromptStore(tmp_path / "store", create=True)
    for name, config in (("prefix", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
                         ("prompt", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))):
        peft.get_peft_model(make_gemma4(), config).save_pretrained(tmp_path / "store" / name)
    model = make_gemma4()
    with pytest.raises(StoreError, match="prefix: the prompt cannot work with the model .*differs by layer"):
        Engine.from_store(store, model, tokenizer)
    assert Engine.from_store(store, model, tokenizer, skip_broken=True).task_names() == ["prompt"]


def make_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    from softprompt.model import prepare_frozen

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, decoder_start_token_id=2, max_position_embeddings=64))
    prepare_frozen(model)
    return model


@pytest.mark.parametrize("init", ["text", "random"])
@pytest.mark.parametrize("method", ["prefix_tuning", "deep_prompt"])
def test_an_encoder_decoder_refuses_a_prefix_when_it_is_built(tokenizer, method, init):
    # text init raised AttributeError ('Tensor' object has no attribute 'layers': the encoder's embeddings came
    # back); random init was built and refused only at the first training step, as an InjectionError
    from tests.test_seq2seq import make_t5

    for model in (make_t5(), make_bart()):
        with pytest.raises(ValueError, match=f"--method {method} puts keys/values into a decoder-only model's "
                                             f"attention cache; {type(model).__name__} is an encoder-decoder: use "
                                             "prompt_tuning or p_tuning"):
            build_method(method, {"num_virtual_tokens": 4, "init": init, "init_text": "good movie"}, model, tokenizer)


def test_cli_train_refuses_a_prefix_on_an_encoder_decoder(tmp_path, tokenizer, env):
    from tests.test_seq2seq import make_t5

    make_t5().save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    argv = train_argv(env, tmp_path / "o", "--method", "prefix_tuning", "--max-steps", "1")
    argv[argv.index("--model") + 1] = tmp_path / "t5"
    _assert_usage_error(argv, "--method prefix_tuning puts keys/values into a decoder-only model's attention cache")


def make_falcon_multi_query():
    """falcon-7b's layout: one key/value head for every query head, though num_kv_heads says 4."""
    from transformers import FalconConfig, FalconForCausalLM

    from softprompt.model import prepare_frozen

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           multi_query=True, new_decoder_architecture=False, pad_token_id=0,
                                           bos_token_id=None, eos_token_id=1))
    prepare_frozen(model)
    return model


def make_deepseek_v3():
    """Multi-head latent attention: the cache holds compressed latents (keys 16 wide, values 4), not heads."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from softprompt.model import prepare_frozen

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=6, first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, max_position_embeddings=256, pad_token_id=0, bos_token_id=None,
        eos_token_id=1))
    prepare_frozen(model)
    return model


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("init", ["random", "text"])
def test_falcon_multi_query_gets_a_one_head_prefix_when_its_config_says_so_and_is_refused_otherwise(tokenizer, init):
    # falcon-7b's multi-query attention caches one key/value head; transformers < 5.25's config said
    # num_kv_heads (4), so a prefix was refused; from 5.25 it says num_key_value_heads = 1, and the prefix is laid
    # out with that one head and must then equal transformers' own forward with the prefix as its cache
    from transformers import DynamicCache

    from softprompt.forward import causal
    from tests.conftest import text_logits

    model = make_falcon_multi_query()
    config = {"num_virtual_tokens": 4, "init": init, "init_text": "good movie"}
    if getattr(model.config, "num_key_value_heads", None) != 1:
        with pytest.raises(ValueError, match=re.escape("the model's attention caches keys (1, 1, 1, 8) and values "
                                                       "(1, 1, 1, 8) for one token in layer 0, but its config gives "
                                                       "(1, 4, 1, 8)")):
            build_method("prefix_tuning", config, model, tokenizer)
        return
    kv = causal.compute_prompt_kv(model, build_method("prefix_tuning", config, model, tokenizer)())
    assert [tuple(k.shape) for k, _ in kv.layers] == [(1, 1, 4, 8)] * 2
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ours = text_logits(model, ids, torch.ones_like(ids), kv)
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv.layers):
        cache.update(k.clone(), v.clone(), i)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=torch.ones(1, 9, dtype=torch.long), past_key_values=cache,
                       position_ids=torch.arange(4, 9)[None]).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - text_logits(model, ids, torch.ones_like(ids), None)).abs().max() > 1e-2  # the prefix counts


@pytest.mark.parametrize(("make", "observed", "expected"), [
    (make_deepseek_v3, "keys (1, 1, 1, 16) and values (1, 1, 1, 4)", "(1, 4, 1, 4)"),
])
@pytest.mark.parametrize("init", ["random", "text"])
def test_a_model_whose_cache_is_not_heads_of_the_configs_size_refuses_a_prefix_when_it_is_built(tokenizer, make,
                                                                                                observed, expected,
                                                                                                init):
    # random init was built and failed in the model's attention at the first step ("Sizes of tensors must
    # match"); text init raised a width error naming neither the model nor the reason
    with pytest.raises(ValueError, match=re.escape(f"the model's attention caches {observed} for one token in layer "
                                                   f"0, but its config gives {expected} = (1, kv_heads, tokens, "
                                                   "head_dim): a key/value prefix cannot be laid out for it")):
        build_method("prefix_tuning", {"num_virtual_tokens": 4, "init": init, "init_text": "good movie"}, make(),
                     tokenizer)


def make_windowed(kind: str):
    """A tiny model whose sliding-window layers keep the last 3 positions' keys/values (window 4)."""
    import transformers

    from softprompt.model import prepare_frozen

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=None,
                  eos_token_id=1, sliding_window=4)
    if kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, use_sliding_window=True,
                                                                       max_window_layers=1))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **common, head_dim=8, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"]))
    prepare_frozen(model)
    return model


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma3"])
def test_text_init_of_a_prefix_as_long_as_the_sliding_window_is_refused_naming_the_window(tokenizer, kind,
                                                                                          monkeypatch):
    # the sliding layers' cache kept 3 of the 4 positions and the prefix failed with "prefix has shape (4, 112),
    # expected (4, 128)"
    model = make_windowed(kind)
    config = {"num_virtual_tokens": 4, "init": "text", "init_text": "good movie"}
    with pytest.raises(ValueError, match=re.escape(
            "the model keeps only the last 3 positions' keys/values in its sliding-window layers (window 4): with "
            "--num-virtual-tokens 4 use --init random, or --num-virtual-tokens 3 or fewer")):
        build_method("deep_prompt", config, model, tokenizer)
    assert build_method("deep_prompt", {**config, "num_virtual_tokens": 3}, model, tokenizer).prefix.shape[0] == 3
    assert build_method("deep_prompt", {**config, "init": "random"}, model, tokenizer).prefix.shape[0] == 4
    import softprompt.forward

    monkeypatch.setattr(softprompt.forward, "local_window", lambda cfg: None)  # a cache that shortens unsaid
    with pytest.raises(ValueError, match=r"the model kept \[[34], [34]\] positions' keys/values per layer of the "
                                         "4-token init text; use --init random"):
        build_method("deep_prompt", config, model, tokenizer)
