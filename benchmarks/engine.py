"""Multi-task inference: softprompt's engine vs PEFT, side by side.

(a) classify: 8 tasks x 64 requests (Rotten Tomatoes reviews, label log-likelihood of " positive" /
    " negative"), 50-token prompts. softprompt: one ``Engine.classify`` call; the requests of all tasks
    share length-sorted mixed batches and every prompt's keys/values were computed once at load. PEFT:
    one PromptTuning adapter per task in one PeftModel (PEFT has no mixed-adapter batches for prompt
    learning), ``set_adapter`` per task, the prompt run through the model with every row. PEFT gets the
    strongest exact setup an expert would write: each task's requests sorted by length, right padding (left
    padding shifts PEFT's positions and changes answers), and the LM head only at the positions read
    (``logits_to_keep``); that is the headline ratio. PEFT as usually written (arrival order, the full
    ``(B, P+T, V)`` logits) is shown as a second, labelled row. Before any time counts, every side's labels
    must equal an independent one-request-at-a-time reference (prompt embeddings + text through the plain
    model); a side that disagrees is reported as wrong and the benchmark exits 1. Every side reads the same
    layout, PEFT's: [prompt, the tokenizer's leading special tokens (a BOS on Llama, Gemma, Mistral), text].
(b) generate: per-token decode latency, batch 1, a 50-token prompt, 20-token input, 32 new tokens.
    Before any time counts, every side's greedy tokens are checked against an uncached reference decode
    (prompt embeddings + text + tokens so far through the full model at every step). A side that leaves the
    reference is reported with the step where it does, is not timed, and the benchmark exits 1, unless the
    reference's logits of the two tokens there are a near tie (within TIE_ULPS rounding steps of the dtype
    at the top logit's size: the order of a tie can flip by rounding alone, which bf16 does on random
    weights) or the side is PEFT ``generate`` with the prompt, wrong with this transformers (README's
    finding for PEFT users), reported but never fatal. Sides: softprompt
    with the cached prompt; the plain base model through the same decoder and through HF ``generate`` (no
    prompt); PEFT ``generate`` with the prompt; and the correct decode an expert writes with PEFT's prompt
    today: ``get_prompt()`` embeddings + text embeddings into HF ``generate(inputs_embeds=...)``.
    Per-token latency = (time for 33 new tokens - time for 1) / 32, median of repeats.

    python benchmarks/engine.py                  # both, default embedded model, CPU fp32
    python benchmarks/engine.py --only classify --requests 64 --tasks 8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from bench_common import label_agreement, sync, time_interleaved

from softprompt import forward
from softprompt.data import leading_special_ids, with_leading
from softprompt.data.builtin import load_builtin
from softprompt.engine import ClassifyRequest, Engine
from softprompt.forward import causal
from softprompt.methods import build_method
from softprompt.model import DEFAULT_MODEL, load_base_model
from softprompt.store import load_prompt, save_prompt

TEMPLATE = "Review: {text}\nSentiment:"
OURS = "softprompt, cached prompt"
PEFT_GENERATE = "peft generate with the prompt"
TIE_ULPS = 4  # a departure at a reference tie closer than this many rounding steps of the dtype is rounding
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


def source_ids(tok, text: str, bos: bool) -> list[int]:
    """A request's ids as PEFT lays out a prompt's input: the tokenizer's leading special tokens (a BOS on
    Llama, Gemma and Mistral tokenizers, none on SmolLM2, GPT-2 and Qwen2) and the rendered review, the layout
    the engine serves a prompt stored with ``bos`` (:attr:`StoredPrompt.bos`; without it, the text alone)."""
    ids = tok(TEMPLATE.format(text=text), add_special_tokens=False)["input_ids"]
    return with_leading(ids, leading_special_ids(tok)) if bos else list(ids)


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
        self.bos = {name: stored.bos for name, stored in prompts.items()}
        self.label_ids = [tok(" " + v, add_special_tokens=False)["input_ids"][0] for v in VERBALIZER.values()]

    @torch.no_grad()
    def classify(self, by_task: dict[str, list[str]], batch_size: int, strong: bool = True) -> dict[str, list[str]]:
        """Labels per task, in request order.

        Args:
            strong: sort each task's requests by length and compute the LM head only at each row's last
                real position (``logits_to_keep`` with those positions); else arrival order and the full
                ``(B, P+T, V)`` logits.
        """
        labels = list(VERBALIZER)
        out = {}
        for task, texts in by_task.items():
            self.model.set_adapter(task)
            sources = [source_ids(self.tok, t, self.bos[task]) for t in texts]
            order = list(range(len(texts)))
            if strong:
                order.sort(key=lambda r: len(sources[r]))
            preds: list[str | None] = [None] * len(texts)
            for i in range(0, len(order), batch_size):
                rows = order[i:i + batch_size]
                enc = self.tok.pad({"input_ids": [sources[r] for r in rows]}, padding=True,
                                   return_tensors="pt").to(self.model.device)
                p = self.model.active_peft_config.num_virtual_tokens
                last = enc["attention_mask"].sum(-1) - 1 + p  # (B,) PEFT's positions count the prompt
                if strong:
                    keep, col = torch.unique(last, return_inverse=True)  # the few distinct last positions
                    logits = self.model(**enc, logits_to_keep=keep).logits  # (B, K, V)
                    picked = logits[torch.arange(len(rows)), col]
                else:
                    logits = self.model(**enc).logits  # (B, P+T, V): PEFT's output covers the prompt too
                    picked = logits[torch.arange(len(rows)), last]
                for r, j in zip(rows, picked[:, self.label_ids].argmax(-1).tolist(), strict=True):
                    preds[r] = labels[j]
            out[task] = preds
        return out


@torch.no_grad()
def reference_labels(model, tok, prompts: dict, by_task: dict[str, list[str]]) -> dict[str, list[str]]:
    """One request at a time: prompt embeddings + the text's embeddings (:func:`source_ids`) through the plain
    model (no cache, no padding); the label with the higher next-token log-likelihood."""
    label_ids = [tok(" " + v, add_special_tokens=False)["input_ids"][0] for v in VERBALIZER.values()]
    emb = model.get_input_embeddings()
    out = {}
    for task, texts in by_task.items():
        prompt = prompts[task].tensors["prompt_embeddings"].to(model.device, model.dtype)[None]  # (1, P, H)
        preds = []
        for text in texts:
            ids = torch.tensor([source_ids(tok, text, prompts[task].bos)], device=model.device)
            logits = model(inputs_embeds=torch.cat([prompt, emb(ids)], 1), logits_to_keep=1).logits[0, -1]
            preds.append(list(VERBALIZER)[int(logits[label_ids].argmax())])
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
    engine = Engine(model, tok, max_batch_rows=args.batch_size)
    for name, stored in prompts.items():
        engine.add_prompt(name, stored)
    sync(dev)
    load_s = time.perf_counter() - t0
    reqs = [ClassifyRequest(task, text) for i in range(args.requests) for task, ts in by_task.items()
            for text in [ts[i]]]  # interleaved: consecutive requests belong to different tasks
    peft = PeftSide(peft_model, tok, prompts)
    n = len(reqs)
    print(f"\n(a) classify: {args.tasks} tasks x {args.requests} requests, {args.prompt_tokens}-token prompts, "
          f"batch <= {args.batch_size}, {model.device} {model.dtype}")
    # exactness first: every side against the one-request-at-a-time reference
    ref = reference_labels(model, tok, prompts, by_task)
    checks = {"softprompt": label_agreement(reqs, engine.classify(reqs), ref),
              "peft strongest": label_agreement(reqs, _as_results(peft.classify(by_task, args.batch_size), reqs),
                                                ref),
              "peft default": label_agreement(reqs, _as_results(peft.classify(by_task, args.batch_size, False),
                                                                reqs), ref)}
    print("    label agreement with the reference: " + ", ".join(f"{k} {v:.4f}" for k, v in checks.items()))
    need = args.min_agreement if args.min_agreement is not None else (1.0 if model.dtype == torch.float32 else 0.98)
    wrong = [k for k, v in checks.items() if v < need]
    if wrong:
        print(f"    WRONG (agreement < {need}): {', '.join(wrong)}; not timed")
        sys.exit(1)
    o, p, d = time_interleaved([lambda: engine.classify(reqs), lambda: peft.classify(by_task, args.batch_size),
                                lambda: peft.classify(by_task, args.batch_size, False)], args.repeats, dev)
    print(f"    softprompt engine (mixed batches, cached prompt KV):       {n / o:8.1f} req/s  ({o:.2f} s; prompt "
          f"KV for {args.tasks} tasks computed once in {load_s:.2f} s)")
    print(f"    peft, strongest exact setup (length-sorted, logits_to_keep): {n / p:8.1f} req/s  ({p:.2f} s)")
    print(f"    peft as usually written (arrival order, full logits):        {n / d:8.1f} req/s  ({d:.2f} s)")
    print(f"    throughput ratio softprompt / peft strongest: {p / o:.2f}x   (/ peft as usually written: {d / o:.2f}x)")


def _as_results(preds: dict[str, list[str]], reqs: list) -> list:
    """PEFT's per-task labels as engine-like results in request order (for :func:`label_agreement`)."""
    pos = {task: 0 for task in preds}
    out = []
    for req in reqs:
        out.append(types.SimpleNamespace(label=preds[req.task][pos[req.task]]))
        pos[req.task] += 1
    return out


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


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first step where two token lists differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def reference_decode(model, prompt: torch.Tensor | None, ids: torch.Tensor, n: int,
                     no_eos: int | None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens without any cache: the full (prompt + text + tokens so far) at every step.

    Args:
        prompt: ``(1, P, H)`` prompt embeddings, or None.
        no_eos: a token id never to pick (what ``min_new_tokens`` does in HF ``generate``), or None.

    Returns:
        The tokens, and each step's ``(V,)`` float logits on the CPU (to tell a near tie from an error).
    """
    emb = model.get_input_embeddings()
    out: list[int] = []
    steps: list[torch.Tensor] = []
    for _ in range(n):
        x = emb(torch.cat([ids, torch.tensor([out], dtype=ids.dtype, device=ids.device)], 1))
        x = x if prompt is None else torch.cat([prompt, x], 1)
        logits = model(inputs_embeds=x, logits_to_keep=1).logits[0, -1].float()
        if no_eos is not None:
            logits[no_eos] = float("-inf")
        out.append(int(logits.argmax()))
        steps.append(logits.cpu())
    return out, steps


def near_tie(got: list[int], ref: tuple[list[int], list[torch.Tensor]], step: int, dtype: torch.dtype) -> str | None:
    """Where ``got`` leaves the reference at ``step``: a description of the near tie it took there (the
    reference's logits of its token and of ``got``'s within :data:`TIE_ULPS` rounding steps of ``dtype``), or
    None when it is not one (a different token by more, or a side that stopped early)."""
    if step >= len(got):
        return None
    logits = ref[1][step]
    top = float(logits[ref[0][step]])
    gap = top - float(logits[got[step]])
    tol = TIE_ULPS * torch.finfo(dtype).eps * max(1.0, abs(top))
    return f"a near tie (logit gap {gap:.2e} <= {tol:.1e}, {dtype} rounding)" if gap <= tol else None


@torch.no_grad()
def bench_generate(args) -> None:
    import peft as peft_pkg
    import transformers

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
    eos = tok.eos_token_id

    def ours(k, key="task0"):  # EOS is not special here: no row stops early
        return causal.decode(model, x, mask, engine.backend.table.rows([key]), [forward.RowSampling(k)], None).tokens[0]

    def hf_plain(k):
        return model.generate(input_ids=x, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, x.shape[1]:].tolist()

    def peft_gen(k):
        return peft.generate(input_ids=x, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, x.shape[1]:].tolist()

    def peft_embeds(k):  # what an expert writes today: PEFT's prompt in front of the text, HF's decoder
        base = peft.get_base_model()
        embeds = torch.cat([peft.get_prompt(batch_size=1).to(model.dtype), base.get_input_embeddings()(x)], 1)
        return base.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                             device=dev),
                             max_new_tokens=k, min_new_tokens=k, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0].tolist()

    prompt = prompts["task0"].tensors["prompt_embeddings"].to(dev, model.dtype)[None]
    refs = {(True, False): reference_decode(model, prompt, x, n + 1, None),
            (True, True): reference_decode(model, prompt, x, n + 1, eos),
            (False, False): reference_decode(model, None, x, n + 1, None),
            (False, True): reference_decode(model, None, x, n + 1, eos)}
    sides = {  # name: (fn, uses the prompt, EOS suppressed like min_new_tokens)
        OURS: (ours, True, False),
        "plain base model, same decoder (no prompt)": (lambda k: ours(k, None), False, False),
        "plain base model, HF generate (no prompt)": (hf_plain, False, True),
        PEFT_GENERATE: (peft_gen, True, True),
        "peft prompt + HF generate(inputs_embeds)": (peft_embeds, True, True),
    }
    print(f"\n(b) generate: per-token latency, batch 1, {args.prompt_tokens}-token prompt, {len(ids)}-token input, "
          f"{n} new tokens, {model.device} {model.dtype}; transformers {transformers.__version__}, peft "
          f"{peft_pkg.__version__}")
    print("    greedy tokens checked against an uncached reference decode before timing")
    right, wrong = [], []  # every check first: nothing is timed when a side that must be exact is wrong
    for name, (fn, with_prompt, no_eos) in sides.items():
        fn(2)  # warm-up
        ref = refs[(with_prompt, no_eos)]
        got = fn(n + 1)
        step = first_difference(got, ref[0])
        if step is None:
            right.append(name)
            continue
        tie = near_tie(got, ref, step, model.dtype)
        why = (f"{tie}; not timed" if tie else "known: PEFT's prompt-tuning generate (see README); not timed"
               if name == PEFT_GENERATE else "not timed")
        print(f"    {name:45} WRONG: leaves the reference decode at new token {step + 1}, {why}")
        if not tie and name != PEFT_GENERATE:
            wrong.append(name)
    if wrong:
        print(f"generate: {', '.join(wrong)} leave the reference decode: no timings are reported", file=sys.stderr)
        sys.exit(1)
    rows = {name: per_token(sides[name][0], n, args.repeats, dev) for name in right}
    for name, v in rows.items():
        print(f"    {name:45} {v * 1000:8.2f} ms/token")
    for other in ("plain base model, HF generate (no prompt)", "peft prompt + HF generate(inputs_embeds)",
                  PEFT_GENERATE):
        if OURS in rows and other in rows:
            print(f"    ratio {other} / softprompt: {rows[other] / rows[OURS]:.2f}x  (> 1: softprompt faster)")


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
    ap.add_argument("--min-agreement", type=float, default=None,
                    help="share of labels that must equal the reference (default 1.0 in float32, 0.98 otherwise)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.only in (None, "classify"):
        bench_classify(args)
    if args.only in (None, "generate"):
        bench_generate(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
