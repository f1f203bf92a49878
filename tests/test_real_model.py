"""Integration tests on the real embedded model (SmolLM2-135M-Instruct); marked slow, still run in CI."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt import forward
from softprompt.config import TrainArgs
from softprompt.data import collate, encode, load_task
from softprompt.evaluate import evaluate_prompt
from softprompt.methods import build_method
from softprompt.model import load_base_model
from softprompt.train import train
from tests.conftest import text_logits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    return load_base_model()


@pytest.fixture(scope="module")
def rt_task():
    return load_task("rotten_tomatoes", max_samples={"train": 160, "validation": 64, "test": 64})


def test_shared_prompt_kv_equals_concatenation_on_real_model(real, rt_task):
    model, tok = real
    method = build_method("prompt_tuning", {"num_virtual_tokens": 8, "init": "sample_vocab"}, model, tok)
    prompt = method().embeds.detach()
    batch = collate(encode(tok, rt_task.examples("test")[:4], max_length=48), tok.pad_token_id)
    ours = text_logits(model, batch.input_ids, batch.attention_mask, forward.compute_prompt_kv(model, prompt))
    b, p = batch.input_ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt[None].expand(b, -1, -1), model.get_input_embeddings()(batch.input_ids)], 1)
    mask = torch.cat([torch.ones(b, p, dtype=torch.long), batch.attention_mask], 1)
    ref = model(inputs_embeds=embeds, attention_mask=mask).logits[:, p:]
    real_tokens = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real_tokens], ref[real_tokens], atol=2e-4, rtol=1e-4)


def test_peft_loads_our_prompt_with_identical_logits(real, tmp_path):
    peft = pytest.importorskip("peft")
    from softprompt.store import export_peft, save_prompt

    model, tok = real
    method = build_method("prompt_tuning", {"num_virtual_tokens": 6, "init": "text"}, model, tok)
    save_prompt(tmp_path / "ours", method, model)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    base, _ = load_base_model()
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
    ids = torch.tensor([tok("A fine film, honestly.", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits[:, 6:]
        ours = text_logits(model, ids, mask, forward.compute_prompt_kv(model, method()))
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def test_short_training_lowers_validation_loss(real, rt_task, tmp_path):
    model, tok = real
    method = build_method("prompt_tuning", {"num_virtual_tokens": 10, "init": "text"}, model, tok)
    valid = rt_task.examples("validation")
    with torch.no_grad():
        before, _ = evaluate_prompt(model, tok, forward.compute_prompt_kv(model, method()), valid, rt_task.format)
    train(model, tok, method, rt_task, TrainArgs(output_dir=str(tmp_path), max_steps=10, batch_size=8,
                                                 eval_every=100, warmup_steps=2))
    with torch.no_grad():
        after, _ = evaluate_prompt(model, tok, forward.compute_prompt_kv(model, method()), valid, rt_task.format)
    assert after["loss"] < before["loss"]


def test_cli_train_then_generate(tmp_path, capsys):
    from softprompt.cli import main

    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4", "--eval-every", "2",
                 "--max-train-samples", "64", "--max-validation-samples", "16", "--max-test-samples", "16",
                 "--num-virtual-tokens", "5", "--k-shot", "2"])
    assert code == 0
    text = capsys.readouterr().out
    for row in ("no soft prompt (template only)", "init text as hard prompt", "2-shot prompting", "tuned soft prompt"):
        assert row in text
    report = json.loads((out / "eval.json").read_text())
    assert report["tuned soft prompt"]["n"] == 16
    code = main(["generate", "--prompt", str(out / "prompt"), "--input", "What a wonderful movie.",
                 "--max-new-tokens", "3"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["input"] == "Review: What a wonderful movie.\nSentiment:" and isinstance(line["output"], str)


def test_engine_mixed_batches_equal_single_uncached_on_real_model(real, rt_task, tmp_path):
    """Three prompts of different lengths in shared batches vs each request alone through the plain HF forward."""
    from softprompt.engine import ClassifyRequest, Engine, GenerateRequest
    from softprompt.store import load_prompt, save_prompt

    model, tok = real
    task_meta = {"template": "Review: {text}\nSentiment:", "target_field": "label",
                 "verbalizer": {"positive": "positive", "negative": "negative"}}
    engine = Engine(model, tok, max_batch_rows=4)
    prompts = {}
    for name, n, seed in (("a", 5, 0), ("b", 12, 1), ("c", 20, 2)):
        method = build_method("prompt_tuning", {"num_virtual_tokens": n, "init": "sample_vocab", "seed": seed},
                              model, tok)
        save_prompt(tmp_path / name, method, model, task=task_meta)
        engine.add_prompt(name, load_prompt(tmp_path / name, model))
        prompts[name] = method().embeds.detach()
    texts = [ex.source for ex in rt_task.examples("test")[:6]]

    def alone(name, text, extra):
        ids = tok(text, add_special_tokens=False)["input_ids"] + extra
        p = prompts[name]
        embeds = torch.cat([p[None], model.get_input_embeddings()(torch.tensor([ids]))], 1)
        with torch.no_grad():
            return model(inputs_embeds=embeds).logits[0, p.shape[0]:], ids

    reqs = [ClassifyRequest(name, text, raw=True) for text in texts for name in ("a", "b", "c")]
    label_ids = [tok(" positive", add_special_tokens=False)["input_ids"][0],
                 tok(" negative", add_special_tokens=False)["input_ids"][0]]
    for req, res in zip(reqs, engine.classify(reqs), strict=True):
        logits, _ = alone(req.task, req.input, [])
        lp = torch.log_softmax(logits[-1].double(), -1)[label_ids]
        assert [res.scores["positive"], res.scores["negative"]] == pytest.approx(lp.tolist(), abs=2e-3)
    gens = engine.generate([GenerateRequest(name, text, raw=True, max_tokens=6)
                            for text in texts[:2] for name in ("a", "c")])
    for (text, name), res in zip([(t, n) for t in texts[:2] for n in ("a", "c")], gens, strict=True):
        new = []
        for _ in range(6):
            logits, _ = alone(name, text, new)
            nxt = int(logits[-1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        assert res.tokens == new
