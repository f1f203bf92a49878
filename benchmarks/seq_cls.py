"""Encoder sequence classification (prompt + head): softprompt vs PEFT ``SEQ_CLS``, side by side.

(a) train step: prompt tuning with a trainable classification head, AdamW, the same right-padded batches
    of Rotten Tomatoes reviews on both sides, both starting from the same prompt and head (ours copied into
    PEFT). Before timing, each side's loss on the first batch and its gradients with respect to the prompt
    and the head are compared with an independent reference (each example alone through the plain model,
    the prompt in front, the head's tensors swapped in); after the timed steps, the two sides' prompts and
    heads must still agree before any time is printed. Examples/s.
(b) classify: T tasks x N requests, each task its own prompt and head. softprompt: one ``Engine.classify``
    call (rows grouped by task, length-sorted batches). PEFT: all tasks as adapters of one PeftModel,
    ``set_adapter`` per task, its strongest exact setup: each task's requests sorted by length, right padding
    (the headline ratio); PEFT in arrival order is a second, labelled row. Before any time counts, every
    side's labels are compared with a one-request-at-a-time reference (the task's prompt and head, the plain
    model, no padding); all sides have just run every request then, which is their warm-up.

Any check that fails exits 1 with nothing timed (``--min-agreement``: the share of labels that must equal the
reference, 1.0 in float32 and 0.98 in half precision by default).

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
import types
from pathlib import Path

import torch
from bench_common import label_agreement, sync, time_interleaved

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


def fail(message: str) -> None:
    """Stop the benchmark with exit status 1: a side computes something other than the reference."""
    print(message + "; nothing is timed", file=sys.stderr)
    sys.exit(1)


def head_inputs(model, ids: torch.Tensor, prompt: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class logits ``(1, C)`` of one unpadded example: the ``(P, H)`` prompt in front of its embeddings, the
    model's own forward with the head's tensors (``{parameter name: tensor}``) in place of its own."""
    x = torch.cat([prompt.to(model.dtype)[None], model.get_input_embeddings()(ids[None])], 1)  # (1, P+T, H)
    params = {n: t.to(model.dtype) for n, t in head.items()}
    mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    return torch.func.functional_call(model, params, (), {"inputs_embeds": x, "attention_mask": mask}).logits.float()


def relative_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference over the reference's largest entry."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


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


def check_train(model, method, pm, batch, half: bool) -> None:
    """Each side's loss on ``batch`` and its gradients (prompt and head) against a one-example-at-a-time
    reference; exit 1 on a difference. The gradients are cleared again afterwards."""
    prompt = method.embeddings.detach().clone().requires_grad_(True)
    head = {n: t.detach().clone().requires_grad_(True) for n, t in zip(method.classifier.names,
                                                                         method.classifier.tensors, strict=True)}
    ref_loss = 0.0
    for ids, mask, label in zip(batch.input_ids, batch.attention_mask.bool(), batch.class_labels, strict=True):
        logits = head_inputs(model, ids[mask], prompt, head)  # right padding dropped: the real tokens only
        loss = torch.nn.functional.cross_entropy(logits, label[None]) / len(batch.input_ids)
        loss.backward()
        ref_loss += float(loss.detach())
    want = {"prompt": prompt.grad, **{n: t.grad for n, t in head.items()}}
    ours_loss = family_of(model).loss(model, batch, family_of(model).step_prompt(model, method()))
    ours_loss.backward()
    peft_loss = pm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.class_labels).loss
    peft_loss.backward()
    got = {"softprompt": {"prompt": method.embeddings.grad,
                          **{n: t.grad for n, t in zip(method.classifier.names, method.classifier.tensors,
                                                       strict=True)}},
           "peft": {"prompt": pm.prompt_encoder["default"].embedding.weight.grad,
                    **{n: peft_head(pm, n).grad for n in method.classifier.names}}}
    losses = {"softprompt": float(ours_loss.detach()), "peft": float(peft_loss.detach())}
    for t in [method.embeddings, *method.classifier.tensors, *(p for p in pm.parameters() if p.requires_grad)]:
        t.grad = None
    grads = {side: max(relative_diff(g[k], want[k]) for k in want) for side, g in got.items()}
    print(f"    first batch: loss reference {ref_loss:.6f}, " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items())
          + "; gradients (prompt, head), largest difference from the reference's over its largest entry: "
          + ", ".join(f"{k} {v:.2e}" for k, v in grads.items()))
    tol, grad_tol = (2e-2, 5e-2) if half else (1e-4, 1e-3)
    bad = [k for k, v in losses.items() if abs(v - ref_loss) > tol * max(1.0, abs(ref_loss))]
    bad += [f"{k} gradients" for k, v in grads.items() if v > grad_tol]
    if bad:
        fail(f"seq_cls train: {', '.join(bad)} not the reference's (loss tolerance {tol:.0e} relative, gradient "
             f"{grad_tol:.0e})")


def peft_head(pm, name: str) -> torch.Tensor:
    """PEFT's trainable copy of the head parameter ``name`` (``classifier.weight``)."""
    module, rest = name.split(".", 1)
    return pm.get_parameter(f"base_model.{module}.modules_to_save.default.{rest}")


def bench_train(args) -> None:
    model, tok = load_encoder(args)
    peft_base, _ = load_encoder(args)
    dev = model.device
    half = model.dtype != torch.float32
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
    print(f"\n(a) train step: {type(model).__name__}, prompt {args.prompt_tokens} tokens + head, batch "
          f"{args.batch_size}, {len(batches) - 1} timed steps, {dev} {model.dtype}")
    check_train(model, method, pm, batches[0], half)

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

    ours_step(batches[0])  # the warm-up, for both sides
    peft_step(batches[0])
    times = {"ours": 0.0, "peft": 0.0}
    for batch in batches[1:]:
        for side, step in (("ours", ours_step), ("peft", peft_step)):  # interleaved: same machine state
            sync(dev)
            t0 = time.perf_counter()
            step(batch)
            sync(dev)
            times[side] += time.perf_counter() - t0
    # the timed updates trained the same thing: an Adam step moves an entry by about lr at most, so a tenth
    # of lr per step (half of it in half precision, where rounding flips near-zero updates) is far from both
    pairs = [(method.embeddings, pm.prompt_encoder["default"].embedding.weight)]
    pairs += [(t, peft_head(pm, n)) for n, t in zip(method.classifier.names, method.classifier.tensors, strict=True)]
    drift = max(float((o.detach().float() - q.detach().float()).abs().max()) for o, q in pairs)
    limit = (0.5 if half else 0.1) * args.lr * len(batches)
    print(f"    largest prompt or head difference after training {drift:.2e}")
    if drift > limit:
        fail(f"seq_cls train: the two sides trained different prompts or heads (largest difference {drift:.2e} > "
             f"{limit:.1e})")
    n = args.batch_size * (len(batches) - 1)
    print(f"    softprompt: {n / times['ours']:8.1f} examples/s   peft: {n / times['peft']:8.1f} examples/s")
    print(f"    throughput ratio softprompt/peft: {times['peft'] / times['ours']:.2f}x")


@torch.no_grad()
def reference_labels(model, tok, methods: dict, by_task: dict[str, list[str]]) -> dict[str, list[str]]:
    """One request at a time: the text with the encoder's own special tokens, the task's prompt in front, its
    head in place of the model's (no padding, no batching); the label with the larger logit."""
    out = {}
    for task, texts in by_task.items():
        method = methods[task]
        head = dict(zip(method.classifier.names, method.classifier.tensors, strict=True))
        out[task] = [LABELS[int(head_inputs(model, torch.tensor(tok(t)["input_ids"], device=model.device),
                                            method.embeddings, head).argmax())] for t in texts]
    return out


def bench_classify(args) -> None:
    model, tok = load_encoder(args)
    peft_base, _ = load_encoder(args)
    dev = model.device
    texts = [ex.source for ex in reviews(args.tasks * args.requests, args.max_words)]
    with tempfile.TemporaryDirectory() as d:
        folders, methods = {}, {}
        engine = Engine(model, tok, max_batch_rows=args.batch_size)
        for t in range(args.tasks):
            name = f"task{t}"
            methods[name] = method = new_method(model, tok, args.prompt_tokens, seed=t, head_std=0.5).to(dev)
            save_prompt(Path(d) / name, method, model, task={"template": "{text}", "target_field": "label",
                                                             "verbalizer": dict(zip(LABELS, LABELS, strict=True)),
                                                             "labels": LABELS})
            engine.add_prompt(name, load_prompt(Path(d) / name, model))
            folders[name] = export_peft(Path(d) / name, Path(d) / f"{name}-peft")
        pm = peft_from(peft_base, folders)
    by_task = {f"task{t}": texts[t * args.requests:(t + 1) * args.requests] for t in range(args.tasks)}
    reqs = [ClassifyRequest(task, ts[i]) for i in range(args.requests) for task, ts in by_task.items()]
    tok.padding_side = "right"

    @torch.no_grad()
    def peft_classify(strong: bool = True) -> dict[str, list[str]]:
        """Labels per task in request order; ``strong``: each task's requests in length-sorted batches."""
        out = {}
        for task, ts in by_task.items():
            pm.set_adapter(task)
            ids = tok(ts)["input_ids"]  # the encoder's own special tokens, as the engine's rows
            order = sorted(range(len(ts)), key=lambda i: len(ids[i])) if strong else list(range(len(ts)))
            preds: list[str | None] = [None] * len(ts)
            for i in range(0, len(order), args.batch_size):
                rows = order[i:i + args.batch_size]
                batch = tok.pad({"input_ids": [ids[r] for r in rows]}, padding=True, return_tensors="pt").to(dev)
                logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                for r, j in zip(rows, logits.argmax(-1).tolist(), strict=True):
                    preds[r] = LABELS[j]
            out[task] = preds
        return out

    n = len(reqs)
    print(f"\n(b) classify: {args.tasks} tasks x {args.requests} requests, each task its own "
          f"{args.prompt_tokens}-token prompt and head, batch <= {args.batch_size}, {dev} {model.dtype}")
    ref = reference_labels(model, tok, methods, by_task)
    checks = {"softprompt": label_agreement(reqs, engine.classify(reqs), ref),  # every side's warm-up, too
              "peft length-sorted": label_agreement(reqs, as_results(peft_classify(), reqs), ref),
              "peft arrival order": label_agreement(reqs, as_results(peft_classify(False), reqs), ref)}
    print("    label agreement with the reference: " + ", ".join(f"{k} {v:.4f}" for k, v in checks.items()))
    need = args.min_agreement if args.min_agreement is not None else (1.0 if model.dtype == torch.float32 else 0.98)
    wrong = [k for k, v in checks.items() if v < need]
    if wrong:
        fail(f"seq_cls classify: {', '.join(wrong)} WRONG (agreement with the reference < {need})")
    o, p, a = time_interleaved([lambda: engine.classify(reqs), peft_classify, lambda: peft_classify(False)],
                               args.repeats, dev)
    print(f"    softprompt engine: {n / o:8.1f} req/s ({o:.2f} s)   peft length-sorted: {n / p:8.1f} req/s "
          f"({p:.2f} s)   peft arrival order: {n / a:8.1f} req/s ({a:.2f} s)")
    print(f"    throughput ratio softprompt/peft: {p / o:.2f}x against PEFT's strongest exact setup (length-sorted "
          f"batches); {a / o:.2f}x against PEFT in arrival order")


def as_results(preds: dict[str, list[str]], reqs: list) -> list:
    """PEFT's per-task labels as engine-like results in request order (for :func:`label_agreement`)."""
    pos = dict.fromkeys(preds, 0)
    out = []
    for req in reqs:
        out.append(types.SimpleNamespace(label=preds[req.task][pos[req.task]]))
        pos[req.task] += 1
    return out


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
    ap.add_argument("--min-agreement", type=float, default=None,
                    help="share of labels that must equal the reference (default 1.0 in float32, 0.98 otherwise)")
    args = ap.parse_args(argv)
    if args.only in (None, "train"):
        bench_train(args)
    if args.only in (None, "classify"):
        bench_classify(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
