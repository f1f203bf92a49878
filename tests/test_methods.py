"""Prompt-tuning initialisations, the method registry and config validation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from softprompt.embeddings import embedding_rms
from softprompt.methods import METHODS, PromptTuning, PromptTuningConfig, build_method, get_method, method_from_saved
from softprompt.methods.prompt_tuning import frequent_token_ids
from tests.conftest import WORD_IDS


def test_registry_holds_prompt_tuning_and_rejects_unknown():
    assert METHODS["prompt_tuning"] is PromptTuning
    with pytest.raises(ValueError, match=r"--method 'lora' is not one of \['deep_prompt', 'p_tuning', "
                                         r"'prefix_tuning', 'prompt_tuning'\]"):
        get_method("lora")


def test_random_init_is_uniform_in_scale(model, tokenizer):
    m = build_method("prompt_tuning", {"num_virtual_tokens": 50, "init": "random", "init_scale": 0.5}, model,
                     tokenizer)
    emb = m.embeddings.detach()
    assert emb.shape == (50, 32)
    rms = embedding_rms(model)  # init_scale is in units of the embedding RMS (0.0195 on this tiny llama)
    assert emb.abs().max() <= 0.5 * rms and emb.abs().max() > 0.45 * rms
    assert abs(float(emb.mean())) < 0.05 * rms
    again = build_method("prompt_tuning", {"num_virtual_tokens": 50, "init": "random"}, model, tokenizer)
    assert torch.equal(emb, again.embeddings.detach())  # seeded


def test_text_init_tiles_and_truncates(model, tokenizer):
    table = model.get_input_embeddings().weight
    m = build_method("prompt_tuning", {"num_virtual_tokens": 5, "init": "text", "init_text": "good movie"}, model,
                     tokenizer)
    ids = [WORD_IDS[w] for w in ["good", "movie", "good", "movie", "good"]]
    assert torch.equal(m.embeddings.detach(), table[ids])
    short = build_method("prompt_tuning", {"num_virtual_tokens": 1, "init": "text", "init_text": "good movie"},
                         model, tokenizer)
    assert torch.equal(short.embeddings.detach(), table[[WORD_IDS["good"]]])


def test_sample_vocab_draws_distinct_frequent_tokens(model, tokenizer):
    table = model.get_input_embeddings().weight
    counts = Counter({WORD_IDS["movie"]: 9, WORD_IDS["film"]: 7, WORD_IDS["[PAD]"]: 100})
    pool = frequent_token_ids(tokenizer, 4, counts)
    assert pool[:2] == [WORD_IDS["movie"], WORD_IDS["film"]]  # most counted first, special tokens never
    assert WORD_IDS["[PAD]"] not in pool and len(pool) == 4
    m = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "sample_vocab", "vocab_sample_size": 4},
                     model, tokenizer, token_counts=counts)
    rows = {tuple(r.tolist()) for r in m.embeddings.detach()}
    assert rows == {tuple(table[t].tolist()) for t in pool}


def test_class_labels_init_puts_label_embeddings_first(model, tokenizer):
    table = model.get_input_embeddings().weight
    m = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "class_labels"}, model, tokenizer,
                     label_texts=[" positive", " very bad"])
    emb = m.embeddings.detach()
    torch.testing.assert_close(emb[0], table[WORD_IDS["positive"]])
    torch.testing.assert_close(emb[1], table[[WORD_IDS["very"], WORD_IDS["bad"]]].mean(0))
    with pytest.raises(ValueError, match="class_labels needs a classification task"):
        build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "class_labels"}, model, tokenizer)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        PromptTuningConfig(num_virtual_tokens=0, init="bogus", init_scale=0, dropout=1.5)
    msg = str(err.value)
    for part in ("--num-virtual-tokens", "--init must be one of", "--init-scale", "--prompt-dropout"):
        assert part in msg
    with pytest.raises(ValueError, match="unknown field"):
        PromptTuningConfig.from_dict({"num_virtual_tokens": 3, "lr": 1})


def test_dropout_only_in_training(model, tokenizer):
    m = build_method("prompt_tuning", {"num_virtual_tokens": 8, "init": "random", "dropout": 0.5}, model,
                     tokenizer)
    m.train()
    assert (m().embeds == 0).any()
    m.eval()
    assert torch.equal(m().embeds, m.embeddings)


def test_saved_round_trip_and_peft_config(model, tokenizer):
    m = build_method("prompt_tuning", {"num_virtual_tokens": 3, "init": "random"}, model, tokenizer)
    back = method_from_saved("prompt_tuning", m.config.to_dict(), m.saved_tensors())
    assert torch.equal(back.embeddings, m.embeddings)
    cfg = m.peft_config(model)
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 3 and cfg["token_dim"] == 32
    with pytest.raises(ValueError, match=r"shape \(2, 32\), expected \(3, hidden_size\)"):
        method_from_saved("prompt_tuning", m.config.to_dict(), {"prompt_embeddings": torch.zeros(2, 32)})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_build_method_refuses_another_methods_config_object(name, model, tokenizer):
    """build_method('prompt_tuning', PrefixTuningConfig(...)) built a prompt_tuning method holding the prefix
    config; save_prompt then wrote a folder load_prompt refused (or p_tuning's config failed with AttributeError)."""
    cls = METHODS[name]
    for other in sorted(set(METHODS) - {name}):
        config = METHODS[other].config_class(num_virtual_tokens=2)
        with pytest.raises(ValueError, match=rf"build_method\('{name}'\): config is a "
                                             rf"{type(config).__name__} \(the {other} config\); {name} takes a "
                                             rf"{cls.config_class.__name__} or a dict of its fields"):
            build_method(name, config, model, tokenizer)
    fields = {"num_virtual_tokens": 2, **({"init": "random"} if "init" in cls.config_class.defaults() else {})}
    own = build_method(name, cls.config_class(**fields), model, tokenizer)
    assert type(own) is cls and type(own.config) is cls.config_class
