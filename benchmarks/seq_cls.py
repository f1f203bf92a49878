"""Encoder sequence classification (prompt + head): softprompt vs PEFT ``SEQ_CLS``, side by side.

(a) train step: prompt tuning with a trainable classification head, AdamW, the same right-padded batches
    of Rotten Tomatoes reviews on both sides, both starting from the same prompt and head (ours exported
    to PEFT). Examples/s, the first step's loss difference and the largest parameter difference after
    the last step (the two must train the same thing).
(b) classify: T tasks x N requests, each task its own prompt and head. softprompt: one ``Engine.classify``
    call (rows grouped by task, length-sorted batches). PEFT: all tasks as adapters of one PeftModel,
    ``set_adapter`` per task, batches of that task's requests. Label agreement is printed.

Without ``--model`` the encoder is a BERT-base-shaped model (12 layers, hidden 768) with random weights and
the default model's tokenizer: no encoder checkpoint can be downloaded here, and speed does not depend on
the weights.

    python benchmarks/seq_cls.py                       # both, CPU fp32
    python benchmarks/seq_cls.py --model ./my-bert --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import label_agreement, sync, time_side_by_side

from softprompt.data import collate, encode_classes
from softprompt.data.builtin import load_builtin
from softprompt.data.template import Example
from softprompt.engine import ClassifyRequest, Engine
from softprompt.forward import family_of
from softprompt.methods import build_method
from softprompt.model import DEFAULT_MODEL, load_base_model, materialize_alias, prepare_frozen, resolve_device
from softprompt.store import export_peft, load_prompt, save_prompt

TEMPLATE = "Review: {text}"
LABELS = ["positive", "negative"]


def load_encoder(args, num_labels: int = 2):
    """The encoder under test and its tokenizer (see the module docstring)."""
    if args.model:
        return load_base_model(args.model, args.device, args.dtype, task_type="seq_cls", num_labels=num_labels)
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(materialize_alias(DEFAULT_MODEL))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                                     num_labels=num_labels))
    prepare_frozen(model)
    dev = resolve_device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" and args.dtype == "auto" else torch.float32
    return model.to(device=dev, dtype=dtype), tok


def reviews(n: int, max_words: int) -> list[Example]:
    rows = load_builtin("rotten_tomatoes")["train"][:n]
    return [Example(TEMPLATE.format(text=" ".join(r["text"].split()[:max_words])), "", r["label"]) for r in rows]



def new_method(model, tok, p: int, seed: int, head_std: float = 0.0):
    method = build_method("prompt_tuning", {"num_virtual_tokens": p, "init": "sample_vocab", "seed": seed}, model,
                          tok)
    if head_std:  # untrained heads all predict alike; spread them so that tasks differ
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for t in method.classifier.tensors:
                t.copy_(torch.randn(t.shape, generator=gen) * head_std)
    return method


def peft_trainable_copy(model, method):
    """PEFT's trainable SEQ_CLS prompt tuning starting from ``method``'s prompt and head.

    (PEFT refuses to load a stored prompt-learning adapter as trainable, so the tensors are copied in.)
    """
    from peft import PromptTuningConfig, TaskType, get_peft_model

    pm = get_peft_model(model, PromptTuningConfig(task_type=TaskType.SEQ_CLS,
                                                  num_virtual_tokens=method.config.num_virtual_tokens))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(method.embeddings)
        for name, t in zip(method.classifier.names, method.classifier.tensors, strict=True):
            module, rest = name.split(".", 1)  # classifier.weight -> PEFT's copy of the classifier module
            pm.get_parameter(f"base_model.{module}.modules_to_save.default.{rest}").copy_(t)
    return pm.eval()


def peft_from(model, folders: dict[str, Path]):
    """A PeftModel with one adapter per folder (our exports), the first one active."""
    from peft import PeftModel

    names = list(folders)
    pm = PeftModel.from_pretrained(model, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(folders[name], adapter_name=name)
    return pm.eval()


def bench_train(args) -> None:
    model, tok = load_encoder(args)
    peft_base, _ = load_encoder(args)
    dev = model.device
    examples = reviews(args.batch_size * args.steps, args.max_words)
    enc = encode_classes(tok, examples, LABELS, max_length=128)
    batches = [collate(enc[i:i + args.batch_size], tok.pad_token_id).to(dev)
               for i in range(0, len(enc), args.batch_size)]
    method = new_method(model, tok, args.prompt_tokens, seed=0).to(dev)
    pm = peft_trainable_copy(peft_base, method)
    ours_params = [p for p in method.parameters() if p.requires_grad]
    peft_params = [p for p in pm.parameters() if p.requires_grad]
    ours_opt = torch.optim.AdamW(ours_params, lr=args.lr)
    peft_opt = torch.optim.AdamW(peft_params, lr=args.lr)

    def ours_step(batch):
        loss = family_of(model).loss(model, batch, family_of(model).step_prompt(model, method()))
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def peft_step(batch):
        loss = pm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.class_labels).loss
        loss.backward()
        peft_opt.step()
        peft_opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = (ours_step(batches[0]), peft_step(batches[0]))  # also the warm-up
    times = {"ours": 0.0, "peft": 0.0}
    for batch in batches[1:]:
        for side, step in (("ours", ours_step), ("peft", peft_step)):  # interleaved: same machine state
            sync(dev)
            t0 = time.perf_counter()
            step(batch)
            sync(dev)
            times[side] += time.perf_counter() - t0
    n = args.batch_size * (len(batches) - 1)
    ours_prompt = method.embeddings.detach()
    peft_prompt = pm.prompt_encoder["default"].embedding.weight.detach()
    drift = float((ours_prompt - peft_prompt.to(ours_prompt)).abs().max())
    print(f"\n(a) train step: {type(model).__name__}, prompt {args.prompt_tokens} tokens + head, batch "
          f"{args.batch_size}, {len(batches) - 1} timed steps, {dev} {model.dtype}")
    print(f"    softprompt: {n / times['ours']:8.1f} examples/s   peft: {n / times['peft']:8.1f} examples/s")
    print(f"    throughput ratio softprompt/peft: {times['peft'] / times['ours']:.2f}x")
    print(f"    first-step loss {first[0]:.6f} vs {first[1]:.6f} (|diff| {abs(first[0] - first[1]):.2e}); "
          f"largest prompt difference after training {drift:.2e}")


def bench_classify(args) -> None:
    model, tok = load_encoder(args)
    peft_base, _ = load_encoder(args)
    dev = model.device
    texts = [ex.source for ex in reviews(args.tasks * args.requests, args.max_words)]
    with tempfile.TemporaryDirectory() as d:
        folders = {}
        engine = Engine(model, tok, max_batch_rows=args.batch_size)
        for t in range(args.tasks):
            name = f"task{t}"
            method = new_method(model, tok, args.prompt_tokens, seed=t, head_std=0.5)
            save_prompt(Path(d) / name, method, model, task={"template": "{text}", "target_field": "label",
                                                             "verbalizer": dict(zip(LABELS, LABELS, strict=True)),
                                                             "labels": LABELS})
            engine.add_prompt(name, load_prompt(Path(d) / name, model))
            folders[name] = export_peft(Path(d) / name, Path(d) / f"{name}-peft")
        pm = peft_from(peft_base, folders)
    by_task = {f"task{t}": texts[t * args.requests:(t + 1) * args.requests] for t in range(args.tasks)}
    reqs = [ClassifyRequest(task, ts[i]) for i in range(args.requests) for task, ts in by_task.items()]

    @torch.no_grad()
    def peft_classify() -> dict[str, list[str]]:
        out = {}
        for task, ts in by_task.items():
            pm.set_adapter(task)
            preds = []
            for i in range(0, len(ts), args.batch_size):
                batch = tok(ts[i:i + args.batch_size], return_tensors="pt", padding=True).to(dev)
                logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                preds += [LABELS[j] for j in logits.argmax(-1).tolist()]
            out[task] = preds
        return out

    tok.padding_side = "right"
    engine.classify(reqs[:args.batch_size])  # warm-up
    o, p, results, peft_preds = time_side_by_side(lambda: engine.classify(reqs), lambda: peft_classify(),
                                                  args.repeats, dev)
    agree = label_agreement(reqs, results, peft_preds)
    n = len(reqs)
    print(f"\n(b) classify: {args.tasks} tasks x {args.requests} requests, each task its own "
          f"{args.prompt_tokens}-token prompt and head, batch <= {args.batch_size}, {dev} {model.dtype}")
    print(f"    softprompt engine: {n / o:8.1f} req/s ({o:.2f} s)   peft set_adapter: {n / p:8.1f} req/s ({p:.2f} s)")
    print(f"    throughput ratio softprompt/peft: {p / o:.2f}x   label agreement: {agree:.4f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a local encoder folder (default: random BERT-base shape)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--only", choices=["train", "classify"])
    ap.add_argument("--steps", type=int, default=12, help="training steps (the first is a warm-up)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--max-words", type=int, default=40, help="reviews are cut to this many words")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="requests per task")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if args.only in (None, "train"):
        bench_train(args)
    if args.only in (None, "classify"):
        bench_classify(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
