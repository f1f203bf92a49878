"""Encoder sequence classification: a soft prompt plus a trainable head on tiny random BERT-family models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from softprompt import forward
from softprompt.config import TrainArgs
from softprompt.data import DataError, Encoded, Example, collate, encode_classes
from softprompt.engine import ClassifyRequest, Engine, GenerateRequest, RequestError, ScoreRequest
from softprompt.evaluate import evaluate_prompt
from softprompt.forward import FamilyError, classifier, family_for_config, family_of
from softprompt.methods import PromptOutput, build_method
from softprompt.methods.head import ClassificationHead
from softprompt.model import ModelLoadError, load_base_model, prepare_frozen
from softprompt.store import StoreError, export_peft, load_prompt, save_prompt
from softprompt.train import train
from tests.conftest import VOCAB, make_model, make_tokenizer, sentiment_records, write_jsonl
from tests.test_cli import TEMPLATE, run
from tests.test_train import FMT, task

ENCODERS = ["bert", "roberta", "distilbert"]


def make_encoder(kind: str = "bert", seed: int = 0, num_labels: int = 2, init_range: float = 0.02):
    """A tiny random frozen encoder with a sequence-classification head."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_labels=num_labels, pad_token_id=0, initializer_range=init_range)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=64, **common))
    elif kind == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=2, intermediate_size=64,
                                                               max_position_embeddings=130, **common))
    else:
        model = DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                                     **common))
    prepare_frozen(model)
    return model


def head_method(model, tokenizer, p=4, seed=0):
    return build_method("prompt_tuning", {"num_virtual_tokens": p, "init": "random", "init_scale": 0.5, "seed": seed},
                        model, tokenizer)


def reference_logits(model, prompt: torch.Tensor, head: ClassificationHead, ids: list[int]) -> torch.Tensor:
    """HF's own forward on one unpadded row: prompt + token embeddings, the head copied into the model."""
    ref = type(model)(model.config)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    with torch.no_grad():
        for name, t in zip(head.names, head.tensors, strict=True):
            ref.get_parameter(name).copy_(t)
    emb = torch.cat([prompt, ref.get_input_embeddings()(torch.tensor(ids))])[None]
    return ref(inputs_embeds=emb).logits[0]


@pytest.mark.parametrize("kind", ENCODERS)
def test_padded_batch_logits_and_grads_equal_hf_forward_per_row(kind, tokenizer):
    model = make_encoder(kind)
    method = head_method(model, tokenizer)
    with torch.no_grad():  # a non-trivial head, so that substituting it is visible
        for t in method.classifier.tensors:
            t.normal_(0, 0.5)
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    batch = collate([Encoded(r, len(r), i % 2) for i, r in enumerate(rows)], tokenizer.pad_token_id)
    out = method()
    logits = classifier.class_logits(model, batch.input_ids, batch.attention_mask, out)
    assert logits.shape == (3, 2)
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i], reference_logits(model, out.embeds.detach(), method.classifier, r),
                                   atol=1e-5, rtol=1e-5)
    loss = family_of(model).loss(model, batch, family_of(model).step_prompt(model, out))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, batch.class_labels))
    loss.backward()
    assert method.embeddings.grad.abs().sum() > 0 and all(t.grad.abs().sum() > 0 for t in method.classifier.tensors)
    assert all(p.grad is None for p in model.parameters())  # the encoder and its own head stay frozen


def test_prompt_and_head_learn_the_task_and_the_encoder_stays_frozen(tmp_path, tokenizer):
    # a larger init range than BERT's 0.02: a tiny random encoder with tiny weights barely mixes tokens
    model = make_encoder("bert", init_range=0.4)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    method = head_method(model, tokenizer)
    data = task(n_train=128, n_valid=32)
    with torch.no_grad():
        before, _ = evaluate_prompt(model, tokenizer, forward.compute_prompt_kv(model, method()),
                                    data.examples("validation"), FMT)
    result = train(model, tokenizer, method, data, TrainArgs(output_dir=str(tmp_path), max_steps=60, batch_size=16,
                                                             optimizer="adamw", lr=0.3, eval_every=30, seed=0))
    with torch.no_grad():
        after, preds = evaluate_prompt(model, tokenizer, forward.compute_prompt_kv(model, method()),
                                       data.examples("validation"), FMT)
    assert after["accuracy"] >= 0.9 > before["accuracy"] and after["loss"] < before["loss"]
    assert result.best_metric >= 0.9 and {p.predicted for p in preds} == {"positive", "negative"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())
    # the checkpoint holds the head with the prompt
    assert any(k.startswith("classifier.") for k in load_file(str(tmp_path / "checkpoint" / "method.safetensors")))


def test_store_round_trip_and_peft_layout(tmp_path, tokenizer):
    model = make_encoder("roberta")
    method = head_method(model, tokenizer)
    with torch.no_grad():
        for t in method.classifier.tensors:
            t.normal_(0, 0.5)
    save_prompt(tmp_path / "p", method, model, task={"template": FMT.template, "target_field": "label",
                                                     "verbalizer": FMT.verbalizer})
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]
    keys = set(load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert keys == {"prompt_embeddings", "base_model.classifier.dense.weight", "base_model.classifier.dense.bias",
                    "base_model.classifier.out_proj.weight", "base_model.classifier.out_proj.bias"}
    loaded = load_prompt(tmp_path / "p", model).build_method()
    batch = collate([Encoded([5, 6, 7], 3, 0), Encoded([8, 9], 2, 1)], 0)
    with torch.no_grad():
        a = classifier.class_logits(model, batch.input_ids, batch.attention_mask, method())
        b = classifier.class_logits(model, batch.input_ids, batch.attention_mask, loaded())
    assert torch.equal(a, b) and loaded.classifier.num_labels == 2


@pytest.mark.parametrize("kind", ENCODERS)
def test_peft_loads_our_export_and_we_load_peft_seq_cls_prompts_with_identical_logits(tmp_path, tokenizer, kind):
    """DistilBERT: PEFT trains and saves every module whose name ends with ``classifier`` (its modules_to_save
    rule), ``pre_classifier`` too. Before, our export lacked it (PeftModel.from_pretrained: KeyError
    'base_model.pre_classifier.weight') and a PEFT folder holding it was refused (not in a classification head)."""
    peft = pytest.importorskip("peft")
    model = make_encoder(kind)
    method = head_method(model, tokenizer)
    with_head = {"distilbert": ["pre_classifier.bias", "pre_classifier.weight"]}.get(kind, [])
    assert [n for n in method.classifier.names if not n.startswith("classifier.")] == with_head
    for name in with_head:  # trained on from the checkpoint's values, as PEFT's copy of the module is
        assert torch.equal(method.classifier.tensors[method.classifier.names.index(name)], model.get_parameter(name))
    with torch.no_grad():
        for t in method.classifier.tensors:
            t.normal_(0, 0.5)
    save_prompt(tmp_path / "ours", method, model)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    exported = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {f"base_model.{n}" for n in with_head} <= set(exported)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = classifier.class_logits(model, ids, mask, method())
        pm = peft.PeftModel.from_pretrained(make_encoder(kind), tmp_path / "peft").eval()
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, ours, atol=1e-5, rtol=1e-5)
        # the other way: a prompt + head written by PEFT itself
        trained = peft.get_peft_model(make_encoder(kind), peft.PromptTuningConfig(
            task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=3, token_dim=32, num_attention_heads=2,
            num_layers=2))
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
        trained.eval()
        expected = trained(input_ids=ids, attention_mask=mask).logits
    trained.save_pretrained(tmp_path / "from-peft")
    stored = load_prompt(tmp_path / "from-peft", model)
    assert stored.method == "prompt_tuning" and stored.build_method().classifier is not None
    with torch.no_grad():
        got = classifier.class_logits(model, ids, mask, stored.build_method()())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_one_frozen_encoder_serves_heads_with_other_label_counts(tmp_path, tokenizer):
    three = make_encoder("bert", num_labels=3)
    method = head_method(three, tokenizer)
    save_prompt(tmp_path / "p3", method, three)
    two = make_encoder("bert", num_labels=2)  # same weights, its own head has 2 classes
    stored = load_prompt(tmp_path / "p3", two)
    batch = collate([Encoded([5, 6, 7], 3, 0)], 0)
    with torch.no_grad():
        logits = classifier.class_logits(two, batch.input_ids, batch.attention_mask, stored.build_method()())
        expected = classifier.class_logits(three, batch.input_ids, batch.attention_mask, method())
    assert logits.shape == (1, 3)
    torch.testing.assert_close(logits, expected)


def test_mismatches_are_clear_errors(tmp_path, tokenizer):
    encoder = make_encoder("bert")
    with pytest.raises(ValueError, match="use prompt_tuning or p_tuning"):
        build_method("prefix_tuning", {"num_virtual_tokens": 2, "init": "random"}, encoder, tokenizer)
    save_prompt(tmp_path / "cls", head_method(encoder, tokenizer), encoder)
    causal = make_model("llama")
    with pytest.raises(StoreError, match="--task-type seq_cls"):
        load_prompt(tmp_path / "cls", causal)
    save_prompt(tmp_path / "lm", build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"}, causal,
                                              tokenizer), causal)
    with pytest.raises(StoreError, match="no classification head"):
        load_prompt(tmp_path / "lm", encoder, check_fingerprint=False)
    wide = make_encoder("bert")
    wide.classifier = torch.nn.Linear(16, 2)  # a head over another width than the stored one
    with pytest.raises(StoreError, match="has shape"):
        load_prompt(tmp_path / "cls", wide, check_fingerprint=False)
    with pytest.raises(DataError, match="'neutral' is not one of"):
        encode_classes(tokenizer, [Example("good", " x", "neutral")], ["positive", "negative"])
    with pytest.raises(RequestError, match="needs a language model"):
        Engine(encoder, tokenizer).generate([GenerateRequest("x", "good")])
    with pytest.raises(forward.InjectionError, match="does not generate"):
        forward.generate(encoder, torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), None, 2, None)
    with pytest.raises(ValueError, match="needs labels"):
        evaluate_prompt(encoder, tokenizer, PromptOutput(), [Example("good", " x")],
                        type(FMT)(FMT.template, "label"))
    from softprompt.export_vllm import VllmExportError, prompt_embeds

    with pytest.raises(VllmExportError, match="classification head"):
        prompt_embeds(encoder, tokenizer, head_method(encoder, tokenizer), "good")
    # a SEQ_CLS config whose head tensors are missing
    cfg_path = tmp_path / "cls" / "adapter_config.json"
    weights = {k: v for k, v in load_file(str(tmp_path / "cls" / "adapter_model.safetensors")).items()
               if not k.startswith("base_model.")}
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "cls" / "adapter_model.safetensors"))
    with pytest.raises(StoreError, match="no classification head tensors"):
        load_prompt(cfg_path.parent)


def test_engine_classifies_mixed_encoder_tasks_and_ensembles_like_one_row_runs(tmp_path, tokenizer):
    from softprompt.store import PromptStore

    model = make_encoder("bert")
    store = PromptStore(tmp_path / "store", create=True)
    verbalizers = {"two": {"positive": "positive", "negative": "negative"},
                   "three": {"good": "good", "bad": "bad", "plot": "plot"}}
    methods = {}
    for name, seed in (("two", 0), ("two_b", 1), ("three", 2)):
        labels = verbalizers["three" if name == "three" else "two"]
        m = make_encoder("bert", num_labels=len(labels))
        method = head_method(m, tokenizer, p=2 + seed, seed=seed)
        with torch.no_grad():
            for t in method.classifier.tensors:
                t.normal_(0, 0.5)
        methods[name] = method
        save_prompt(tmp_path / name, method, m, task={"template": "Review: {text}", "target_field": "label",
                                                      "verbalizer": labels, "labels": list(labels)})
        store.add(name, tmp_path / name)
    store.add_ensemble("both", ["two", "two_b"], "mean")
    engine = Engine.from_store(store, model, tokenizer, max_batch_rows=3)
    texts = ["good movie", "the plot was very bad", "a film", "great great film is not awful", "bad"]
    reqs = [ClassifyRequest(task, text) for text in texts for task in ("two", "three", "both", "two_b")]
    results = engine.classify(reqs)
    for req, res in zip(reqs, results, strict=True):
        members = ["two", "two_b"] if req.task == "both" else [req.task]
        per = []
        for member in members:
            ids = tokenizer(f"Review: {req.input}")["input_ids"]
            with torch.no_grad():
                logits = classifier.class_logits(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                             methods[member]())
            per.append(torch.log_softmax(logits[0], -1))
        labels = list(verbalizers["three" if req.task == "three" else "two"])
        expected = torch.stack(per).exp().mean(0).log() if len(per) > 1 else per[0]
        assert res.label == labels[int(expected.argmax())]
        if len(per) == 1:
            assert list(res.scores) == labels
            got = torch.tensor([res.scores[lab] for lab in labels], dtype=torch.float64)
            torch.testing.assert_close(got, expected.double(), atol=1e-5, rtol=1e-5)
    assert engine.describe("three")["labels"] == ["good", "bad", "plot"]  # the head's order, not sorted
    with pytest.raises(RequestError, match="needs a language model"):
        engine.score([ScoreRequest("two", "good", " positive")])
    with pytest.raises(RequestError, match="needs a language model"):
        engine.add_base("base")
    engine.unload("both")
    engine.unload("two")
    assert engine.task_names() == ["three", "two_b"] and set(engine.backend.keys()) == {"three", "two_b"}


def test_task_type_resolution_and_loading(tmp_path):
    bert = make_encoder("bert")
    cfg = bert.config
    for archs in (["BertForMaskedLM"], ["BertModel"], None):
        cfg.architectures = archs
        assert family_for_config(cfg, "auto").name == "seq_cls"
    cfg.architectures = ["BertLMHeadModel"]
    assert family_for_config(cfg, "auto").name == "causal_lm"
    assert family_for_config(make_model("llama").config, "auto").name == "causal_lm"
    with pytest.raises(FamilyError, match="seq_cls takes an encoder"):
        family_for_config(make_model("llama").config, "seq_cls")
    with pytest.raises(FamilyError, match="seq2seq_lm takes an encoder-decoder"):
        family_for_config(cfg, "seq2seq_lm")
    make_model("llama").save_pretrained(tmp_path / "llama")
    make_tokenizer().save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelLoadError, match="seq_cls takes an encoder"):  # loading names the same problem
        load_base_model(tmp_path / "llama", "cpu", "float32", task_type="seq_cls", num_labels=2)
    bert.save_pretrained(tmp_path / "bert")
    make_tokenizer().save_pretrained(tmp_path / "bert")
    model, _ = load_base_model(tmp_path / "bert", "cpu", "float32", task_type="seq_cls", num_labels=4)
    assert type(model).__name__ == "BertForSequenceClassification" and model.classifier.out_features == 4
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.fixture(scope="module")
def encoder_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("seqcls")
    make_encoder("bert", init_range=0.4).save_pretrained(d / "bert")
    make_tokenizer().save_pretrained(d / "bert")
    return {"model": d / "bert", "train": write_jsonl(d / "train.jsonl", sentiment_records(96, seed=0)),
            "validation": write_jsonl(d / "validation.jsonl", sentiment_records(16, seed=1)),
            "test": write_jsonl(d / "test.jsonl", sentiment_records(32, seed=2)), "root": d}


def test_cli_trains_evaluates_and_exports_an_encoder_classifier(encoder_env):
    env, out = encoder_env, encoder_env["root"] / "run"
    common = ["--template", TEMPLATE, "--target-field", "label", "--verbalizer", "positive=positive,negative=negative"]
    rc, stdout, stderr = run(["train", "--model", env["model"], "--task-type", "seq_cls", "--train-file", env["train"],
                              "--validation-file", env["validation"], "--test-file", env["test"], *common,
                              "--num-virtual-tokens", "4", "--init", "random", "--batch-size", "16",
                              "--optimizer", "adamw", "--lr", "0.3", "--max-steps", "30", "--eval-every", "10",
                              "--output-dir", out])
    assert rc == 0, stderr
    assert "BertForSequenceClassification head (2 classes)" in stdout
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"tuned head, no prompt", "tuned soft prompt"}
    assert report["tuned soft prompt"]["accuracy"] >= 0.9
    # eval finds the task type from the stored prompt (the saved config says BertForSequenceClassification too)
    rc, stdout, stderr = run(["eval", "--prompt", out / "prompt", "--model", env["model"], "--test-file",
                              env["test"], "--report", out / "again.json"])
    assert rc == 0, stderr
    again = json.loads((out / "again.json").read_text())
    # the class order is recorded: the verbalizer is written as a JSON object with sorted keys
    assert again["tuned soft prompt"]["accuracy"] == report["tuned soft prompt"]["accuracy"]
    assert json.loads((out / "prompt" / "softprompt.json").read_text())["task"]["labels"] == ["positive", "negative"]
    rc, _, stderr = run(["eval", "--prompt", out / "prompt", "--model", env["model"], "--test-file", env["test"],
                         "--verbalizer", "good=good,bad=bad"])
    assert rc == 2 and "differ from the 2 classes the prompt's head was trained on (positive, negative)" in stderr
    rc, stdout, stderr = run(["inspect", out / "prompt", "--model", env["model"], "--json"])
    assert rc == 0, stderr
    assert len(json.loads(stdout)["prompts"][0]["tokens"]) == 4
    rc, _, stderr = run(["train", "--model", env["model"], "--task-type", "seq_cls", "--train-file", env["train"],
                         "--template", TEMPLATE, "--target-field", "label", "--method", "prefix_tuning",
                         "--verbalizer", "positive=positive,negative=negative", "--output-dir", out / "bad"])
    assert rc == 2 and "use prompt_tuning or p_tuning" in stderr
    rc, _, stderr = run(["train", "--model", env["model"], "--task-type", "seq_cls", "--train-file", env["train"],
                         "--template", TEMPLATE, "--target-field", "label", "--output-dir", out / "bad2"])
    assert rc == 2 and "needs labels" in stderr


def test_server_classifies_with_an_encoder_store_and_refuses_completions(tmp_path, tokenizer):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from softprompt.server import Scheduler, ServerState, create_app
    from softprompt.store import PromptStore

    model = make_encoder("bert")
    method = head_method(model, tokenizer)
    save_prompt(tmp_path / "p", method, model, task={"template": "Review: {text}", "target_field": "label",
                                                     "verbalizer": FMT.verbalizer, "labels": FMT.labels})
    store = PromptStore(tmp_path / "store", create=True)
    store.add("sentiment", tmp_path / "p")
    engine = Engine.from_store(store, model, tokenizer)
    with TestClient(create_app(ServerState(engine, Scheduler(engine), store=store))) as client:
        r = client.post("/v1/classify", json={"model": "sentiment", "input": ["good film", "bad plot"]})
        assert r.status_code == 200, r.text
        direct = engine.classify([ClassifyRequest("sentiment", "good film"), ClassifyRequest("sentiment", "bad plot")])
        assert [d["label"] for d in r.json()["data"]] == [x.label for x in direct]
        r = client.post("/v1/completions", json={"model": "sentiment", "prompt": "good"})
        assert 400 <= r.status_code < 500 and "needs a language model" in r.json()["error"]["message"]


def test_p_tuning_prompt_with_a_head_saves_folded_and_loads_with_the_same_logits(tmp_path, tokenizer):
    model = make_encoder("distilbert")
    method = build_method("p_tuning", {"num_virtual_tokens": 3, "encoder": "lstm"}, model, tokenizer)
    assert method.classifier is not None
    batch = collate([Encoded([5, 6, 7], 3, 0), Encoded([8, 9], 2, 1)], 0)
    loss = family_of(model).loss(model, batch, family_of(model).step_prompt(model, method()))
    loss.backward()
    assert all(p.grad is not None for p in method.parameters())
    method.eval()
    save_prompt(tmp_path / "p", method, model)
    stored = load_prompt(tmp_path / "p", model)
    assert stored.peft_config["peft_type"] == "P_TUNING" and stored.peft_config["task_type"] == "SEQ_CLS"
    with torch.no_grad():
        a = classifier.class_logits(model, batch.input_ids, batch.attention_mask, method())
        b = classifier.class_logits(model, batch.input_ids, batch.attention_mask, stored.build_method()())
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_trains_the_same_prompt_and_head(tmp_path, tokenizer):
    outs = []
    for gc in (False, True):
        model = make_encoder("bert", init_range=0.4)
        method = head_method(model, tokenizer)
        train(model, tokenizer, method, task(64, 8), TrainArgs(output_dir=str(tmp_path / str(gc)), max_steps=4,
                                                               batch_size=8, optimizer="adamw", lr=0.1,
                                                               eval_every=4, gradient_checkpointing=gc))
        outs.append([p.detach().clone() for p in method.parameters()])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_roberta_positions_start_after_the_padding_id_so_its_context_is_one_padding_id_smaller(tokenizer):
    """RoBERTa numbers positions from pad_token_id + 1: 130 position embeddings (pad 0) hold 129 tokens. The
    130th was an IndexError inside the model (a device-side assert on CUDA, which breaks a server); now every
    check (train's --max-length fit, the guard, the engine's context) counts 129."""
    from softprompt.forward import InjectionError
    from softprompt.model import context_length

    model = make_encoder("roberta")
    assert context_length(model.config)[0] == 129 and context_length(make_encoder("bert").config)[0] == 512
    assert Engine(model, tokenizer).context == 129
    method = head_method(model, tokenizer, p=4)
    fits = collate([Encoded([5] * 125, 125, 0)], 0)  # 4 + 125 = 129 tokens
    with torch.no_grad():
        assert classifier.class_logits(model, fits.input_ids, fits.attention_mask, method()).shape == (1, 2)
        over = collate([Encoded([5] * 126, 126, 0)], 0)
        with pytest.raises(InjectionError, match="more than the model's 129 positions"):
            classifier.class_logits(model, over.input_ids, over.attention_mask, method())


def test_a_stored_head_may_not_replace_the_frozen_models_own_weights(tmp_path, tokenizer):
    """Any base_model.* tensor shaped like a model parameter loaded, and replaced that weight for the task (an
    encoder's word embeddings, say): the model is frozen and shared, a prompt may carry the head only."""
    from safetensors.torch import load_file, save_file

    encoder = make_encoder("bert")
    save_prompt(tmp_path / "cls", head_method(encoder, tokenizer), encoder)
    path = tmp_path / "cls" / "adapter_model.safetensors"
    weights = load_file(str(path))
    emb = encoder.bert.embeddings.word_embeddings.weight
    weights["base_model.bert.embeddings.word_embeddings.weight"] = torch.zeros_like(emb)
    save_file(weights, str(path))
    with pytest.raises(StoreError, match=r"are not in a classification head .*never the model's weights"):
        load_prompt(tmp_path / "cls", encoder)
    from softprompt.methods.head import head_problems

    tensors = {"base_model.bert.embeddings.word_embeddings.weight": torch.zeros_like(emb),
               **{k: v for k, v in weights.items() if k.startswith("base_model.classifier.")}}
    assert any("outside the model's head 'classifier'" in p for p in head_problems(tensors, encoder))
