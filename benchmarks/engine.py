"""Multi-task inference: softprompt's engine vs PEFT, side by side.

(a) classify: 8 tasks x 64 requests (Rotten Tomatoes reviews, label log-likelihood of " positive" /
    " negative"), 50-token prompts. softprompt: one ``Engine.classify`` call; the requests of all tasks
    share length-sorted mixed batches and every prompt's keys/values were computed once at load. PEFT:
    one PromptTuning adapter per task in one PeftModel, ``set_adapter`` per task, batches of that task's
    requests (the prompt runs through the model with every row). Same max batch size. The predicted labels
    of both are compared.
(b) generate: per-token decode latency, batch 1, a 50-token prompt, 20-token input, 32 new tokens (EOS
    ignored): softprompt with the cached prompt, the plain base model through the same decoder (no
    prompt), the plain base model through HF ``generate``, and PEFT ``generate`` with the prompt. Per-token
    latency = (time for 33 new tokens - time for 1) / 32, median of repeats.

    python benchmarks/engine.py                  # both, default embedded model, CPU fp32
    python benchmarks/engine.py --only classify --requests 64 --tasks 8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import label_agreement, sync, time_side_by_side

from softprompt import inject
from softprompt.data.builtin import load_builtin
from softprompt.engine import ClassifyRequest, Engine
from softprompt.methods import build_method
from softprompt.model import DEFAULT_MODEL, load_base_model
from softprompt.store import load_prompt, save_prompt

TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = {"positive": "positive", "negative": "negative"}


def make_prompts(model, tok, n_tasks: int, p: int, folder: Path) -> dict[str, object]:
    """``n_tasks`` stored prompts of ``p`` virtual tokens (sampled-vocab init, a different seed each)."""
    out = {}
    for t in range(n_tasks):
        method = build_method("prompt_tuning", {"num_virtual_tokens": p, "init": "sample_vocab", "seed": t},
                              model, tok)
        save_prompt(folder / f"task{t}", method, model,
                    task={"template": TEMPLATE, "target_field": "label", "verbalizer": VERBALIZER})
        out[f"task{t}"] = load_prompt(folder / f"task{t}", model)
    return out


def reviews(n: int, max_words: int = 40) -> list[str]:
    """The first ``n`` test reviews of Rotten Tomatoes, each cut to ``max_words`` words."""
    return [" ".join(r["text"].split()[:max_words]) for r in load_builtin("rotten_tomatoes")["test"][:n]]


class PeftSide:
    """PEFT PromptTuning with one adapter per task on a second copy of the base model."""

    def __init__(self, model, tok, prompts: dict):
        from peft import PromptTuningConfig, get_peft_model

        names = list(prompts)
        cfg = lambda: PromptTuningConfig(task_type="CAUSAL_LM",  # noqa: E731
                                         num_virtual_tokens=prompts[names[0]].tensors["prompt_embeddings"].shape[0])
        self.model = get_peft_model(model, cfg(), adapter_name=names[0])
        for name in names[1:]:
            self.model.add_adapter(name, cfg())
        for name in names:
            enc = self.model.prompt_encoder[name]
            enc.embedding.weight.data.copy_(prompts[name].tensors["prompt_embeddings"].to(enc.embedding.weight))
        self.tok = tok
        self.label_ids = [tok(" " + v, add_special_tokens=False)["input_ids"][0] for v in VERBALIZER.values()]

    @torch.no_grad()
    def classify(self, by_task: dict[str, list[str]], batch_size: int) -> dict[str, list[str]]:
        labels = list(VERBALIZER)
        out = {}
        for task, texts in by_task.items():
            self.model.set_adapter(task)
            preds = []
            for i in range(0, len(texts), batch_size):
                enc = self.tok([TEMPLATE.format(text=t) for t in texts[i:i + batch_size]], return_tensors="pt",
                               padding=True, add_special_tokens=False).to(self.model.device)
                logits = self.model(**enc).logits  # (B, P+T, V): PEFT's output covers the prompt too
                last = enc["attention_mask"].sum(-1) - 1 + (logits.shape[1] - enc["input_ids"].shape[1])
                lp = logits[torch.arange(len(last)), last][:, self.label_ids]
                preds += [labels[j] for j in lp.argmax(-1).tolist()]
            out[task] = preds
        return out



def bench_classify(args) -> None:
    model, tok = load_base_model(args.model, args.device, args.dtype)
    peft_model, _ = load_base_model(args.model, args.device, args.dtype)
    tok.padding_side = "right"
    dev = model.device
    with tempfile.TemporaryDirectory() as d:
        prompts = make_prompts(model, tok, args.tasks, args.prompt_tokens, Path(d))
    texts = reviews(args.tasks * args.requests)
    by_task = {f"task{t}": texts[t * args.requests:(t + 1) * args.requests] for t in range(args.tasks)}
    t0 = time.perf_counter()
    engine = Engine(model, tok, max_batch_size=args.batch_size)
    for name, stored in prompts.items():
        engine.add_prompt(name, stored)
    sync(dev)
    load_s = time.perf_counter() - t0
    reqs = [ClassifyRequest(task, text) for i in range(args.requests) for task, ts in by_task.items()
            for text in [ts[i]]]  # interleaved: consecutive requests belong to different tasks
    peft = PeftSide(peft_model, tok, prompts)
    engine.classify(reqs[: args.batch_size])  # warm-up
    peft.classify({k: v[:2] for k, v in by_task.items()}, args.batch_size)
    o, p, results, peft_preds = time_side_by_side(lambda: engine.classify(reqs),
                                                  lambda: peft.classify(by_task, args.batch_size), args.repeats, dev)
    agree = label_agreement(reqs, results, peft_preds)
    n = len(reqs)
    print(f"\n(a) classify: {args.tasks} tasks x {args.requests} requests, {args.prompt_tokens}-token prompts, "
          f"batch <= {args.batch_size}, {model.device} {model.dtype}")
    print(f"    softprompt engine (mixed batches, cached prompt KV): {n / o:8.1f} req/s  ({o:.2f} s; prompt "
          f"KV for {args.tasks} tasks computed once in {load_s:.2f} s)")
    print(f"    peft (set_adapter per task):                         {n / p:8.1f} req/s  ({p:.2f} s)")
    print(f"    throughput ratio softprompt/peft: {p / o:.2f}x   label agreement: {agree:.4f}")


def per_token(fn, n: int, repeats: int, dev) -> float:
    """Median over repeats of (time for n+1 new tokens - time for 1) / n."""
    vals = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn(1)
        sync(dev)
        t1 = time.perf_counter()
        fn(n + 1)
        sync(dev)
        t2 = time.perf_counter()
        vals.append(((t2 - t1) - (t1 - t0)) / n)
    return statistics.median(vals)


@torch.no_grad()
def bench_generate(args) -> None:
    model, tok = load_base_model(args.model, args.device, args.dtype)
    peft_model, _ = load_base_model(args.model, args.device, args.dtype)
    dev = model.device
    with tempfile.TemporaryDirectory() as d:
        prompts = make_prompts(model, tok, 1, args.prompt_tokens, Path(d))
    engine = Engine(model, tok)
    engine.add_prompt("task0", prompts["task0"])
    ids = tok(" ".join(reviews(1, max_words=200)[0].split()), add_special_tokens=False)["input_ids"][:20]
    x = torch.tensor([ids], device=dev)
    mask = torch.ones_like(x)
    peft = PeftSide(peft_model, tok, prompts).model
    peft.set_adapter("task0")
    n = args.new_tokens

    def ours(k, key="task0"):
        inject.decode(model, x, mask, engine.table.rows([key]), [inject.RowSampling(k)], None)

    def hf_plain(k):
        model.generate(input_ids=x, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                       pad_token_id=tok.pad_token_id)

    def peft_gen(k):
        peft.generate(input_ids=x, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                      pad_token_id=tok.pad_token_id)

    for fn in (ours, hf_plain, peft_gen):  # warm-up
        fn(2)
    rows = {"softprompt, cached 50-token prompt": per_token(ours, n, args.repeats, dev),
            "plain base model, same decoder (no prompt)": per_token(lambda k: ours(k, None), n, args.repeats, dev),
            "plain base model, HF generate (no prompt)": per_token(hf_plain, n, args.repeats, dev),
            "peft generate with the prompt": per_token(peft_gen, n, args.repeats, dev)}
    print(f"\n(b) generate: per-token latency, batch 1, {args.prompt_tokens}-token prompt, {len(ids)}-token input, "
          f"{n} new tokens, {model.device} {model.dtype}")
    for name, v in rows.items():
        print(f"    {name:45} {v * 1000:8.2f} ms/token")
    ours_v = rows["softprompt, cached 50-token prompt"]
    print(f"    ratio plain-HF/softprompt: {rows['plain base model, HF generate (no prompt)'] / ours_v:.2f}x   "
          f"ratio peft/softprompt: {rows['peft generate with the prompt'] / ours_v:.2f}x  (> 1: softprompt faster)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--only", choices=["classify", "generate"])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64, help="requests per task")
    ap.add_argument("--prompt-tokens", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.only in (None, "classify"):
        bench_classify(args)
    if args.only in (None, "generate"):
        bench_generate(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
