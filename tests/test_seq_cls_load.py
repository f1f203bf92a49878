"""Encoder classifiers loaded from checkpoints that lack a layer between the encoder and the head.

DeBERTa-v2/v3's ``pooler.dense``, DistilBERT's ``pre_classifier`` and BERT's pooler (in a checkpoint saved
without it, as every masked-LM one) are not in an MLM checkpoint: transformers initialises them at random at
every load. They train and store with the head, so a prompt gives the same logits in every process.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
)

from softprompt import forward
from softprompt.config import TrainArgs
from softprompt.forward import classifier
from softprompt.forward.classifier import untrained_weights
from softprompt.methods import build_method
from softprompt.model import ModelLoadError, load_base_model
from softprompt.store import StoreError, export_peft, load_prompt, save_prompt
from softprompt.train import train
from tests.conftest import VOCAB, make_tokenizer
from tests.test_train import task

MLM = {
    "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                                                                 hidden_dim=64, pad_token_id=0)),
    "deberta-v2": lambda: DebertaV2ForMaskedLM(DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"], pad_token_id=0)),
}
LACKS = {"distilbert": ("pre_classifier.weight", "pre_classifier.bias"),
         "deberta-v2": ("pooler.dense.weight", "pooler.dense.bias")}


def mlm_folder(tmp_path, kind):
    torch.manual_seed(0)
    MLM[kind]().save_pretrained(tmp_path / kind)
    make_tokenizer().save_pretrained(tmp_path / kind)
    return tmp_path / kind


def logits(model, method, ids):
    with torch.no_grad():
        return classifier.class_logits(model, ids, torch.ones_like(ids), forward.compute_prompt_kv(model, method()))


@pytest.mark.parametrize("kind", sorted(MLM))
def test_a_layer_the_checkpoint_lacks_trains_with_the_head_and_serves_the_same_after_a_reload(tmp_path, kind):
    """Before, that layer was frozen at the random init of each load: the prompt trained against one random
    pooler was evaluated in another process against another, with other logits (and another accuracy)."""
    folder = mlm_folder(tmp_path, kind)
    model, tok = load_base_model(folder, "cpu", "float32", task_type="seq_cls")
    assert set(untrained_weights(model)) == set(LACKS[kind])
    method = build_method("prompt_tuning", {"num_virtual_tokens": 3, "init": "random", "seed": 0}, model, tok)
    assert set(LACKS[kind]) <= set(method.classifier.names)
    before = {n: t.detach().clone() for n, t in zip(method.classifier.names, method.classifier.tensors, strict=True)}
    train(model, tok, method, task(n_train=16, n_valid=8),
          TrainArgs(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=8, lr=0.05, eval_every=100, seed=0))
    after = dict(zip(method.classifier.names, method.classifier.tensors, strict=True))
    assert all(not torch.equal(before[n], after[n]) for n in LACKS[kind])  # the missing layer trained
    save_prompt(tmp_path / "p", method, model)
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"][2:] == [LACKS[kind][0].rsplit(".", 1)[0]]
    assert {f"base_model.{n}" for n in LACKS[kind]} <= set(load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    ids = torch.tensor([tok("the movie was good")["input_ids"]])
    expected = logits(model, method, ids)
    other, _ = load_base_model(folder, "cpu", "float32", task_type="seq_cls")  # another process, another init
    got = logits(other, load_prompt(tmp_path / "p", other).build_method(), ids)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_a_stored_prompt_without_the_layer_the_checkpoint_lacks_is_refused(tmp_path):
    folder = mlm_folder(tmp_path, "distilbert")
    model, tok = load_base_model(folder, "cpu", "float32", task_type="seq_cls")
    method = build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"}, model, tok)
    save_prompt(tmp_path / "p", method, model)
    path = tmp_path / "p" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "pre_classifier" not in k}, str(path))
    with pytest.raises(StoreError, match="lacks pre_classifier.weight, pre_classifier.bias.*train it again"):
        load_prompt(tmp_path / "p", model)
    # the allow-list is the layers the checkpoint lacked, nothing else
    tensors = load_file(str(path))
    tensors["base_model.distilbert.transformer.layer.0.ffn.lin1.bias"] = torch.zeros(64)
    save_file(tensors, str(path))
    with pytest.raises(StoreError, match="not in a classification head"):
        load_prompt(tmp_path / "p", model)
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "modules_to_save": [*cfg["modules_to_save"], "distilbert.transformer"]}))
    with pytest.raises(StoreError, match="outside the model's head 'classifier' or among the weights its checkpoint"):
        load_prompt(tmp_path / "p", model)


def test_a_checkpoint_without_the_input_embeddings_is_refused(tmp_path):
    folder = mlm_folder(tmp_path, "distilbert")
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "word_embeddings" not in k}, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="no input embeddings"):
        load_base_model(folder, "cpu", "float32", task_type="seq_cls")


def test_peft_reads_the_layer_the_checkpoint_lacks_from_our_export(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    folder = mlm_folder(tmp_path, "deberta-v2")
    model, tok = load_base_model(folder, "cpu", "float32", task_type="seq_cls")
    method = build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"}, model, tok)
    with torch.no_grad():
        for t in method.classifier.tensors:
            t.normal_(0, 0.5)
    save_prompt(tmp_path / "ours", method, model)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    ids = torch.tensor([tok("the movie was good")["input_ids"]])
    base = AutoModelForSequenceClassification.from_pretrained(folder)  # its own random pooler
    with torch.no_grad():
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        torch.testing.assert_close(pm(input_ids=ids).logits, logits(model, method, ids), atol=1e-5, rtol=1e-5)


def test_a_peft_prompt_trained_on_a_checkpoint_without_pre_classifier_loads_with_peft_s_own(tmp_path):
    """PEFT saves DistilBERT's pre_classifier with its classifier (modules_to_save ``classifier`` matches by name
    ending): such a folder was refused as replacing weights outside the head; it brings the layer the checkpoint
    lacks, with the logits PEFT gives."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    folder = mlm_folder(tmp_path, "distilbert")
    torch.manual_seed(0)
    trained = peft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(folder), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=3, token_dim=32, num_attention_heads=2, num_layers=2))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    trained.eval().save_pretrained(tmp_path / "peft")
    model, tok = load_base_model(folder, "cpu", "float32", task_type="seq_cls")  # its own random pre_classifier
    ids = torch.tensor([tok("the movie was good")["input_ids"]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    torch.testing.assert_close(logits(model, load_prompt(tmp_path / "peft", model).build_method(), ids), expected,
                               atol=1e-5, rtol=1e-5)


def esm(**kw):
    from transformers import EsmConfig, EsmForMaskedLM

    torch.manual_seed(0)
    return EsmForMaskedLM(EsmConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=66, pad_token_id=1,
                                    mask_token_id=32, **kw))


@pytest.mark.parametrize("kw", [dict(position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False),
                                dict(position_embedding_type="absolute", token_dropout=False,
                                     emb_layer_norm_before=True)], ids=["esm2", "esm1b"])
def test_esm_whose_embeddings_layer_runs_on_ids_only_is_refused(tmp_path, kw):
    """EsmModel skips its embeddings layer (token-dropout rescaling, positions, layer norm) given inputs_embeds:
    the prompt and the text went in without it, even with no prompt, in silence."""
    from transformers import EsmForSequenceClassification

    esm(**kw).save_pretrained(tmp_path / "esm")
    make_tokenizer().save_pretrained(tmp_path / "esm")
    with pytest.raises(ModelLoadError, match="computes something else from token ids than from its embedding"):
        load_base_model(tmp_path / "esm", "cpu", "float32", task_type="seq_cls")
    model = EsmForSequenceClassification.from_pretrained(tmp_path / "esm").eval()  # built in memory: refused too
    with pytest.raises(forward.InjectionError, match="computes something else"):
        classifier.class_logits(model, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), None)


def test_longformer_gets_its_global_attention_mask_and_perceiver_is_refused_clearly(tmp_path):
    """Longformer built its global attention mask from input_ids (a TypeError with inputs_embeds); Perceiver,
    which --task-type auto took as an encoder, failed on an AttributeError deep in the code."""
    from transformers import LongformerConfig, LongformerForMaskedLM, PerceiverConfig, PerceiverForMaskedLM

    torch.manual_seed(0)
    LongformerForMaskedLM(LongformerConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, attention_window=4, max_position_embeddings=66,
                                           pad_token_id=1)).save_pretrained(tmp_path / "lf")
    make_tokenizer().save_pretrained(tmp_path / "lf")
    model, tok = load_base_model(tmp_path / "lf", "cpu", "float32")
    method = build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"}, model, tok)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert logits(model, method, ids).shape == (1, 2)
        ours = classifier.class_logits(model, ids, torch.ones_like(ids), None)
        torch.testing.assert_close(ours, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    PerceiverForMaskedLM(PerceiverConfig(vocab_size=VOCAB, d_model=32, d_latents=32, num_latents=4,
                                         num_self_attends_per_block=1, num_self_attention_heads=2,
                                         num_cross_attention_heads=2, max_position_embeddings=64)
                         ).save_pretrained(tmp_path / "perceiver")
    make_tokenizer().save_pretrained(tmp_path / "perceiver")
    with pytest.raises(ModelLoadError, match="--task-type seq_cls: PerceiverForSequenceClassification has no "
                                             "classification head child"):
        load_base_model(tmp_path / "perceiver", "cpu", "float32")
