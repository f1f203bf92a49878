"""Encoder-decoders beyond T5 (BART, mBART, M2M100, FSMT): decoder start, plain greedy decoding, probes."""

from __future__ import annotations

import torch
from transformers import MBartConfig, MBartForConditionalGeneration

from softprompt import forward
from softprompt.data import Encoded, collate
from softprompt.model import prepare_frozen

SMALL = dict(vocab_size=52, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
SOURCE = [6, 7, 4, 2]


def tiny(cls, config_cls, **extra):
    torch.manual_seed(0)
    model = cls(config_cls(**SMALL, **extra))
    prepare_frozen(model)
    return model


def first_step_logprobs(model) -> torch.Tensor:
    """HF's own forward: the decoder's first distribution after its start token (what generate starts from)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([SOURCE]), decoder_input_ids=torch.tensor([[2]])).logits[0, -1]
    return torch.log_softmax(logits.float(), -1)


def test_mbart_scores_every_label_after_the_decoder_start_token_not_after_its_own_last_token():
    """mBART's labels= shift starts the decoder from the last label token: label [8] was scored as P(8 | 8)."""
    model = tiny(MBartForConditionalGeneration, MBartConfig)
    batch = collate([Encoded(SOURCE + [lab], len(SOURCE)) for lab in (8, 9, 10)], 1)
    got = forward.family_of(model).target_logprobs(model, batch, None)
    torch.testing.assert_close(got, first_step_logprobs(model)[[8, 9, 10]], atol=1e-5, rtol=1e-5)
