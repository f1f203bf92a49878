"""Prompt tuning on an encoder-decoder (tiny random T5): the prompt goes in front of the encoder input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from softprompt import forward
from softprompt.config import TrainArgs
from softprompt.data import Encoded, TaskFormat, collate
from softprompt.evaluate import evaluate_prompt, label_scores
from softprompt.forward import family_of, seq2seq
from softprompt.methods import build_method
from softprompt.model import prepare_frozen
from softprompt.store import export_peft, load_prompt, save_prompt
from softprompt.train import train
from tests.conftest import VOCAB
from tests.test_train import FMT, task


def make_t5(seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    model = T5ForConditionalGeneration(cfg)
    prepare_frozen(model)
    return model


def reference_loss(model, prompt, src, tgt):
    """HF's own forward: prompt embeddings + source embeddings as encoder input, target as labels."""
    emb = torch.cat([prompt, model.get_input_embeddings()(torch.tensor(src))])[None]
    return model(inputs_embeds=emb, labels=torch.tensor([tgt])).loss


def test_loss_and_gradient_equal_hf_forward_with_prompt_on_the_encoder():
    model = make_t5()
    prompt = torch.randn(3, 32, requires_grad=True)
    rows = [([5, 6, 7, 8], [9, 10]), ([11, 12], [13])]
    batch = collate([Encoded(s + t, len(s)) for s, t in rows], 0)
    family = family_of(model)
    loss = family.loss(model, batch, family.step_prompt(model, prompt, "auto"))
    n = sum(len(t) for _, t in rows)
    ref = sum(reference_loss(model, prompt, s, t) * len(t) for s, t in rows) / n  # token-weighted mean
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(loss, prompt)
    (g_ref,) = torch.autograd.grad(ref, prompt)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-4)
    lp = family.target_logprobs(model, batch, prompt.detach())
    assert lp.shape == (2,) and float(lp[1]) == pytest.approx(-float(reference_loss(model, prompt, *rows[1])),
                                                            rel=1e-4)


def test_t5_prompt_trains_evaluates_generates_and_round_trips(tmp_path, tokenizer):
    model = make_t5()
    method = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "sample_vocab"}, model, tokenizer)
    data = task(n_train=48, n_valid=16)
    with torch.no_grad():
        before, _ = evaluate_prompt(model, tokenizer, forward.compute_prompt_kv(model, method()),
                                    data.examples("validation"), FMT)
    train(model, tokenizer, method, data, TrainArgs(output_dir=str(tmp_path / "run"), max_steps=25, batch_size=8,
                                                    optimizer="adamw", lr=0.1, eval_every=25, seed=0))
    with torch.no_grad():
        prompt = forward.compute_prompt_kv(model, method())
        after, preds = evaluate_prompt(model, tokenizer, prompt, data.examples("validation"), FMT)
        scores = label_scores(model, tokenizer, prompt, data.examples("validation")[:2], FMT, 2)
    assert after["loss"] < before["loss"] and scores.shape == (2, 2)
    save_prompt(tmp_path / "p", method, model, task={"template": FMT.template, "target_field": "label",
                                                     "verbalizer": FMT.verbalizer})
    stored = load_prompt(tmp_path / "p", model)
    assert stored.peft_config["task_type"] == "SEQ_2_SEQ_LM"
    batch = collate([Encoded([5, 6, 7], 3)], 0, "left")
    new = forward.generate(model, batch.input_ids, batch.attention_mask,
                          forward.compute_prompt_kv(model, stored.build_method()()), 3, None)
    assert len(new[0]) == 3


def test_peft_loads_exported_t5_prompt_with_identical_logits(tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    model = make_t5()
    method = build_method("prompt_tuning", {"num_virtual_tokens": 3, "init": "random"}, model, tokenizer)
    save_prompt(tmp_path / "ours", method, model)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(make_t5(), tmp_path / "peft").eval()
    rows = [([5, 6, 7, 8], [9, 10, 11]), ([12, 13], [14])]  # sources and targets of different lengths
    batch = collate([Encoded(s + t, len(s)) for s, t in rows], 0)
    with torch.no_grad():
        embeds, mask, labels = seq2seq.encoder_inputs(model, batch, method().embeds)  # our encoder input
        ours = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        src = torch.tensor([s + [0] * (4 - len(s)) for s, _ in rows])  # (B, S), padded on the right
        theirs = pm(input_ids=src, attention_mask=(src != 0).long(), labels=labels)
        plain = make_t5()(input_ids=src, attention_mask=(src != 0).long(), labels=labels)
    assert ours.logits.shape == theirs.logits.shape == (2, 3, VOCAB)  # (B, L, V) decoder logits
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-4)
    assert (ours.logits - plain.logits).abs().max() > 1e-2  # the prompt changes them
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
    # and the loss the training loop minimises is PEFT's
    torch.testing.assert_close(family_of(model).loss(model, batch, method().embeds), theirs.loss, atol=1e-5, rtol=1e-5)


def test_engine_refuses_encoder_decoder_clearly(tokenizer):
    from softprompt.engine import Engine, EngineError

    with pytest.raises(EngineError, match="encoder-decoder"):
        Engine(make_t5(), tokenizer)


def test_cli_trains_and_generates_with_a_t5_folder(tmp_path, tokenizer):
    from softprompt.cli import main
    from tests.conftest import sentiment_records, write_jsonl

    make_t5().save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", sentiment_records(n, seed=i))
             for i, (s, n) in enumerate((("train", 16), ("validation", 4), ("test", 4)))}
    rc = main(["train", "--model", str(tmp_path / "t5"), "--train-file", str(files["train"]), "--validation-file",
               str(files["validation"]), "--test-file", str(files["test"]), "--template", FMT.template,
               "--target-field", "label", "--verbalizer", "positive=positive,negative=negative",
               "--num-virtual-tokens", "3", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2",
               "--baselines", "no_prompt", "--output-dir", str(tmp_path / "run")])
    assert rc == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(report) == {"no soft prompt (template only)", "tuned soft prompt"}
    assert main(["generate", "--model", str(tmp_path / "t5"), "--prompt", str(tmp_path / "run" / "prompt"),
                 "--input", "good"]) == 2  # the engine (generate/serve) is for decoder-only models


def t5_tokenizer():
    """The tiny word tokenizer with T5's post-processor: every text ends with </s> ([EOS], id 1)."""
    from tests.test_bos import word_tokenizer

    return word_tokenizer("$A [EOS]", ("[EOS]",))


def test_the_encoder_reads_each_source_closed_by_its_eos_as_peft_users_tokenise_it(tmp_path):
    """T5 reads every encoder input closed by </s> (pre-training; a PEFT user's tokenizer(source)): the
    source was [P, src] here. Training, label scores and generation read [P, src, </s>]; the loss equals
    PEFT's on the source tokenised with special tokens; a prompt stored before (bos true, no 'specials') keeps
    the layout it was trained with."""
    peft = pytest.importorskip("peft")
    from softprompt.data import Example

    tok, model = t5_tokenizer(), make_t5()
    eos = 1
    assert tok("good movie")["input_ids"][-1] == eos
    family = family_of(model)
    exs = [Example("Review : good movie Sentiment :", " positive"), Example("Review : awful Sentiment :", " negative")]
    enc = family.encode_examples(tok, exs, FMT, 256)
    for e, ex in zip(enc, exs, strict=True):
        assert e.input_ids[:e.target_start] == tok(ex.source)["input_ids"]  # the source and its </s>
    (cut,) = family.encode_examples(tok, exs[:1], FMT, 5)  # cut from the left, the </s> kept
    assert cut.input_ids[:cut.target_start][-1] == eos and len(cut.input_ids) == 5
    method = build_method("prompt_tuning", {"num_virtual_tokens": 3, "init": "random"}, model, tok)
    save_prompt(tmp_path / "ours", method, model)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(make_t5(), tmp_path / "peft").eval()
    batch = collate(enc, 0)
    src = [tok(ex.source)["input_ids"] for ex in exs]
    width = max(map(len, src))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in src])
    labels = torch.tensor([tok(ex.target, add_special_tokens=False)["input_ids"] for ex in exs])  # a label word
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss
        torch.testing.assert_close(family.loss(model, batch, method().embeds), theirs, atol=1e-5, rtol=1e-5)
    # label scores and generation read the same encoder input
    seen, real_lp = [], seq2seq.target_logprobs

    def spy_lp(model, batch, embeds):
        seen.extend(batch.input_ids[i][batch.attention_mask[i].bool() & ~batch.target_mask[i]].tolist()
                    for i in range(len(batch.input_ids)))
        return real_lp(model, batch, embeds)

    import softprompt.evaluate as evaluate_mod

    real_gen, gen_inputs = evaluate_mod.generate, []

    def spy_gen(model, input_ids, attention_mask, *args, **kwargs):
        gen_inputs.extend(input_ids[i][attention_mask[i].bool()].tolist() for i in range(len(input_ids)))
        return real_gen(model, input_ids, attention_mask, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seq2seq, "target_logprobs", spy_lp)
        mp.setattr(evaluate_mod, "generate", spy_gen)
        with torch.no_grad():
            prompt = method().embeds
            family.label_scores(model, tok, prompt, exs, FMT, 8)
            gen = TaskFormat(FMT.template, FMT.target_field)
            evaluate_prompt(model, tok, prompt, [gen.render({"text": "good movie", "label": " positive"})], gen,
                            max_new_tokens=2, with_loss=False)
    assert seen and all(s[-1] == eos for s in seen)
    assert gen_inputs == [tok("Review: good movie\nSentiment:")["input_ids"]]
    # the legacy flag: written before 'specials', a T5 prompt's "bos": true meant [P, src]
    stored = load_prompt(tmp_path / "ours")
    assert stored.bos and family.trail_ids(tok, stored.bos) == [eos]
    meta = json.loads((tmp_path / "ours" / "softprompt.json").read_text())
    del meta["specials"]
    (tmp_path / "ours" / "softprompt.json").write_text(json.dumps(meta))
    assert load_prompt(tmp_path / "ours").bos is False and family.trail_ids(tok, False) == []


def test_t5_baselines_read_the_source_with_its_eos_after_a_hard_prompt_too(monkeypatch):
    """After a hard prompt or k-shot context a causal LM's text gets no second BOS (bos false); T5's source
    still ends with its </s> (it lost it, the hard-prompt rows being read on another layout than the rest)."""
    import softprompt.workflows.baselines as baselines
    from softprompt.config import DataArgs, EvalArgs
    from softprompt.data import TaskData

    layouts, real = {}, baselines.evaluate_prompt

    def spy(model, tok, kv, examples, fmt, *args, bos=True, **kwargs):
        layouts.setdefault(len(layouts), bos)
        return real(model, tok, kv, examples, fmt, *args, bos=bos, **kwargs)

    monkeypatch.setattr(baselines, "evaluate_prompt", spy)
    data = task(16, 4)
    data = TaskData(FMT, {"train": data.examples("train"), "test": data.examples("validation")})
    args = {"eval": EvalArgs(k_shot=2, max_new_tokens=2), "data": DataArgs(max_length=64)}
    report = baselines.evaluate_with_baselines(make_t5(), t5_tokenizer(), data, args, "Classify sentiment .",
                                               data.examples("test"))
    assert len(report) == 3 and list(layouts.values()) == [True, True, True]


def test_a_t5_prompt_folder_written_by_peft_loads_as_the_rows_peft_reads(tmp_path, tokenizer):
    """PEFT saves a SEQ_2_SEQ_LM prompt with num_transformer_submodules 2, as 2P rows, and its encoder reads the
    first P: the folder was refused ("only decoder-only (causal LM) prompts ... are supported")."""
    peft = pytest.importorskip("peft")
    model = make_t5()
    pm = peft.get_peft_model(make_t5(), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_()
    pm.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["num_transformer_submodules"] == 2
    stored = load_prompt(tmp_path / "peft", model)
    assert stored.tensors["prompt_embeddings"].shape == (3, 32)
    assert stored.peft_config["num_transformer_submodules"] == 1
    rows = [([5, 6, 7, 8], [9, 10, 11]), ([12, 13], [14])]
    batch = collate([Encoded(s + t, len(s)) for s, t in rows], 0)
    src = torch.tensor([s + [0] * (4 - len(s)) for s, _ in rows])
    _, _, labels = seq2seq.encoder_inputs(model, batch, None)
    with torch.no_grad():
        theirs = pm.eval()(input_ids=src, attention_mask=(src != 0).long(), labels=labels).loss
        ours = family_of(model).loss(model, batch, stored.build_method()().embeds)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_an_encoder_that_scales_its_ids_embeddings_in_its_forward_reads_the_text_at_its_scale(tokenizer):
    """Marian, Pegasus, MVP and BlenderbotSmall multiply embed_tokens(ids) by sqrt(d_model) inside the
    encoder, and not inputs_embeds: the text went in at 1/sqrt(d) of the scale the model was trained on, with
    no prompt too (the no-prompt baseline), silently. T5 and BART scale in the module (factor 1 here)."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    cfg = MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, scale_embedding=True,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, max_position_embeddings=64,
                       dropout=0.0)
    marian = MarianMTModel(cfg)
    prepare_frozen(marian)
    assert seq2seq.encoder_embed_scale(marian) == pytest.approx(32 ** 0.5)
    assert seq2seq.encoder_embed_scale(make_t5()) == 1.0
    rows = [([5, 6, 7, 8], [9, 10]), ([11, 12], [13])]
    batch = collate([Encoded(s + t, len(s)) for s, t in rows], 0)
    family = family_of(marian)
    with torch.no_grad():
        _, _, labels = seq2seq.encoder_inputs(marian, batch, None)
        src = torch.tensor([s + [0] * (4 - len(s)) for s, _ in rows])
        ref = marian(input_ids=src, attention_mask=(src != 0).long(), labels=labels).loss  # the model on its ids
        torch.testing.assert_close(family.loss(marian, batch, None), ref, atol=1e-5, rtol=1e-5)
        prompt = torch.randn(3, 32)
        emb, mask, labels = seq2seq.encoder_inputs(marian, batch, prompt)
        scaled = torch.cat([prompt[None].expand(2, -1, -1), marian.get_input_embeddings()(src)], 1) * 32 ** 0.5
        torch.testing.assert_close(emb[:, :3], scaled[:, :3])
        (new,) = seq2seq.decode(marian, src[:1], (src[:1] != 0).long(), prompt, [forward.RowSampling(2)], 1).tokens
        dec = torch.tensor([[0]])  # the model on the scaled prompt + text, greedy (generate would force its EOS)
        for _ in range(2):
            nxt = marian(inputs_embeds=scaled[:1], decoder_input_ids=dec).logits[0, -1].argmax()
            dec = torch.cat([dec, nxt.view(1, 1)], 1)
        alone = dec[0, 1:].tolist()
        assert new == [t for t in alone if t != 1][:len(new)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_prompt_for_another_kind_of_model_of_the_same_width_is_refused(tmp_path, tokenizer, kind):
    """A T5 prompt folder without softprompt.json (no fingerprint: PEFT's) loaded on a decoder-only model of the
    same width: its PEFT layout of 2P rows was cut to P and it ran as a decoder prompt."""
    import safetensors.torch

    from softprompt.store import CONFIG_NAME, META_NAME, WEIGHTS_NAME, StoreError
    from tests.conftest import make_model

    t5, decoder = make_t5(), make_model(kind)
    folder = save_prompt(tmp_path / "t5", build_method("prompt_tuning", {"num_virtual_tokens": 3}, t5, tokenizer), t5)
    expected = "task_type 'SEQ_2_SEQ_LM' (a prompt for an encoder-decoder) but the model"
    with pytest.raises(StoreError, match=re.escape(f"{folder}: {CONFIG_NAME} has {expected}")):
        load_prompt(folder, decoder, check_fingerprint=False)  # another kind of model, not only other weights
    (folder / META_NAME).unlink()
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    rows = safetensors.torch.load_file(folder / WEIGHTS_NAME)["prompt_embeddings"]
    safetensors.torch.save_file({"prompt_embeddings": torch.cat([rows, rows])}, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps({**cfg, "num_transformer_submodules": 2}))  # as PEFT writes it
    assert load_prompt(folder, t5).tensors["prompt_embeddings"].shape == (3, 32)
    with pytest.raises(StoreError, match=re.escape(expected) + ".*is a decoder-only language model "
                                                               r"\(task_type 'CAUSAL_LM'\)"):
        load_prompt(folder, decoder)
    # a PEFT folder that leaves task_type null names no kind of model: it loads on any of the same width
    (folder / CONFIG_NAME).write_text(json.dumps({**cfg, "task_type": None}))
    safetensors.torch.save_file({"prompt_embeddings": rows}, folder / WEIGHTS_NAME)
    assert load_prompt(folder, decoder).tensors["prompt_embeddings"].shape == (3, 32)
    # and a decoder's prompt is refused on the encoder-decoder
    (folder / CONFIG_NAME).write_text(json.dumps({**cfg, "task_type": "CAUSAL_LM"}))
    with pytest.raises(StoreError, match=re.escape("task_type 'CAUSAL_LM' (a prompt for a decoder-only language model) "
                                                   "but the model (T5ForConditionalGeneration) is an encoder-decoder")):
        load_prompt(folder, t5)
