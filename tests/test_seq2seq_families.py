"""Encoder-decoders beyond T5 (BART, mBART, M2M100, FSMT): decoder start, plain greedy decoding, probes."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration

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


def manual_greedy(model, steps: int) -> list[int]:
    """Argmax at every step from the decoder start, the whole sequence recomputed each time (no cache)."""
    dec, out = torch.tensor([[2]]), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([SOURCE]), decoder_input_ids=dec).logits[0, -1].argmax())
            out.append(nxt)
            dec = torch.cat([dec, torch.tensor([[nxt]])], 1)
    return out


def test_greedy_generation_ignores_the_checkpoints_beams_ngram_blocking_and_forced_tokens():
    """facebook/bart-large's generation_config (4 beams, no 3-gram repeats, forced BOS and EOS, a minimum
    length) was merged into the greedy decode: other tokens than the argmax, a BOS the decoder never saw in
    training, and an EOS forced at the last step that read as a finished answer."""
    model = tiny(BartForConditionalGeneration, BartConfig)
    with torch.no_grad():
        model.final_logits_bias[0, 2] = -20.0  # the random model never ends by itself
    gc = model.generation_config
    gc.num_beams, gc.no_repeat_ngram_size, gc.early_stopping, gc.min_length = 4, 1, True, 3
    gc.forced_bos_token_id, gc.forced_eos_token_id, gc.length_penalty = 0, 2, 2.0
    expected = manual_greedy(model, 5)
    assert len(set(expected)) < 5  # it repeats a token: n-gram blocking would change it
    ids = torch.tensor([SOURCE])
    decoded = forward.family_of(model).decode(model, ids, torch.ones_like(ids), None, [forward.RowSampling(5)], 2)
    assert decoded.tokens == [expected] and decoded.finish == ["length"]
    assert forward.generate(model, ids, torch.ones_like(ids), None, 5, 2) == [expected]


def test_m2m100_whose_padding_id_is_1_is_accepted_and_reads_its_text_as_on_ids():
    """The ids-vs-embeddings probe used ids 1..3; 1 is M2M100's (and NLLB's) padding id, which its positions skip
    on ids only: every M2M100 and NLLB checkpoint was refused as one a prompt cannot go in front of."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    model = tiny(M2M100ForConditionalGeneration, M2M100Config, scale_embedding=True)
    batch = collate([Encoded(SOURCE + [lab], len(SOURCE)) for lab in (8, 9)], 1)
    got = forward.family_of(model).target_logprobs(model, batch, None)
    torch.testing.assert_close(got, first_step_logprobs(model)[[8, 9]], atol=1e-5, rtol=1e-5)


def test_fsmt_whose_encoder_takes_no_embeddings_is_refused_at_load(tmp_path):
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    from softprompt.model import ModelLoadError, load_base_model
    from tests.conftest import make_tokenizer

    torch.manual_seed(0)
    FSMTForConditionalGeneration(FSMTConfig(src_vocab_size=52, tgt_vocab_size=52, langs=["en", "de"], **{
        k: v for k, v in SMALL.items() if k != "vocab_size"})).save_pretrained(tmp_path / "fsmt")
    make_tokenizer().save_pretrained(tmp_path / "fsmt")
    with pytest.raises(ModelLoadError, match="--task-type seq2seq_lm: FSMTForConditionalGeneration's encoder cannot "
                                             "take a prompt in front of its input"):
        load_base_model(tmp_path / "fsmt", "cpu", "float32")
