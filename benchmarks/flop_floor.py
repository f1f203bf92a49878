"""The arithmetic each side of ``train_step.py`` and ``engine.py --only classify`` must do, and its time at a
matrix rate: the floor under which no implementation of that side goes, to read a GPU measurement against.

    python benchmarks/flop_floor.py --shape llama-1b --train 64:100 16:20 --classify 64:100 16:20

Counts are from the benchmarks' own batches and requests (the same tokenizer, data, lengths and padding):
a side's positions (padded ones too) times the frozen model's multiply-adds, plus attention and the LM head.
A prompt-tuning step runs the frozen model forward and back to the prompt; with frozen weights the backward
pass computes gradients of the activations only, so a linear layer costs about one forward's arithmetic
again and attention about two (the gradients of queries, keys and values). Sides:

- ``concat`` (softprompt's concat pass): every row runs the prompt with its text, the LM head at targets;
- ``shared_kv``: the prompt runs once per batch and every row attends to its keys and values;
- ``peft``: as concat, plus full-vocabulary logits at every position (forward and backward);
- ``peft_targets``: as concat, but the LM head at the batch's target positions in every row (the union:
  ``logits_to_keep`` keeps the same positions for all rows);
- classify: softprompt runs each request's text alone (the prompt's keys and values are cached per task,
  computed once when a prompt is added), length-sorted across tasks; PEFT runs prompt and text per request,
  length-sorted within each task, the LM head at one position.

The default rate is the bf16 matrix product measured on this workplace's H200 (788 TFLOP/s on 8192^3); a
real step reaches a fraction of it, so the floors are lower bounds and their ratios the most a method's
arithmetic can give.

``--ops`` adds what a GPU step may be bound by instead: the operator calls one step of each side makes
(``aten::`` calls counted by torch.profiler on the CPU over two steps, on a model of the shape's depth and
vocabulary at width 64: the count depends on the depth and the code path, not on width, batch or prompt
length). On a GPU each call costs the host a few microseconds whether or not it has work to launch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import reviews, source_ids  # noqa: E402
from random_model import SHAPES  # noqa: E402
from train_step import make_batches  # noqa: E402

from softprompt.model import load_base_model  # noqa: E402


class Shape:
    """Per-position arithmetic of a llama-like decoder (FLOPs: 2 per multiply-add)."""

    def __init__(self, s: dict):
        h, kv = s["hidden_size"], s["hidden_size"] * s["num_key_value_heads"] // s["num_attention_heads"]
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * s["intermediate_size"]
        self.body = 2 * per_layer * s["num_hidden_layers"]  # one position through every linear layer
        self.attn = 4 * h * s["num_hidden_layers"]  # one query against one key: QK and AV
        self.head = 2 * h * s["vocab_size"]  # one position's logits

    def causal(self, rows: int, n: int, before: int = 0) -> float:
        """Attention of ``rows`` rows of ``n`` positions, each seeing ``before`` keys and the earlier ones."""
        return rows * self.attn * (n * before + n * (n + 1) / 2)


def train_flops(shape: Shape, batches, p: int) -> dict[str, float]:
    """Mean FLOPs of one training step of each side over ``batches``."""
    out = {"concat": 0.0, "shared_kv": 0.0, "peft": 0.0, "peft_targets": 0.0}
    for b in batches:
        rows, n = b.input_ids.shape
        targets = int(b.target_mask.sum())
        union = int(b.target_mask.any(0).sum())  # text positions with a target in some row
        body = 2 * shape.body * rows * (p + n) + 3 * shape.causal(rows, p + n)
        out["concat"] += body + 2 * shape.head * targets
        out["shared_kv"] += 2 * shape.body * (p + rows * n) + 3 * (shape.causal(1, p) + shape.causal(rows, n, p)) \
            + 2 * shape.head * targets
        out["peft"] += body + 2 * shape.head * rows * (p + n)
        out["peft_targets"] += body + 2 * shape.head * rows * union
    return {k: v / len(batches) for k, v in out.items()}


def classify_flops(shape: Shape, lengths: list[list[int]], batch: int, p: int) -> dict[str, float]:
    """FLOPs of all requests (``lengths[task]``: each request's tokens) on each side; the cached prompt's
    keys and values once per task are counted apart (``prompt_kv``)."""

    def padded(ls: list[int], before: int) -> float:
        ls, total = sorted(ls), 0.0
        for i in range(0, len(ls), batch):
            rows, n = len(ls[i:i + batch]), before + max(ls[i:i + batch])
            total += shape.body * rows * n + shape.causal(rows, n) + shape.head * rows
        return total

    ours = padded([n for ls in lengths for n in ls], 0) + sum(shape.causal(len(ls), max(ls), p) for ls in lengths)
    return {"softprompt": ours, "prompt_kv": len(lengths) * (shape.body * p + shape.causal(1, p)),
            "peft": sum(padded(ls, p) for ls in lengths)}


def train_sides(tok, p: int) -> dict:
    """The sides of ``train_step.py`` under the names :func:`train_flops` counts, each a function of the model."""
    from train_step import SIDES, Ours

    return {"concat": lambda m: Ours(m, tok, "concat", p), "shared_kv": lambda m: Ours(m, tok, "shared_kv", p),
            "peft": lambda m: SIDES["peft"](m, p), "peft_targets": lambda m: SIDES["peft_targets"](m, p)}


def op_counts(s: dict, tok, batch: int, p: int) -> dict[str, float]:
    """``aten::`` calls per training step of each side of ``train_step.py`` (see the module's ``--ops``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    small = {**s, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    cfg = LlamaConfig(**small, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    batches = make_batches(tok, 3, batch, "cpu")
    out = {}
    for name, make in train_sides(tok, p).items():
        torch.manual_seed(0)
        side = make(LlamaForCausalLM(cfg).requires_grad_(False))
        side.step(batches[0])  # the first step probes the model (cached)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[1:]:
                side.step(b)
        out[name] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / (len(batches) - 1)
    return out


def batch_prompt(value: str) -> tuple[int, int]:
    """``"64:100"`` -> ``(64, 100)``: rows per batch and virtual tokens, both positive (an argparse type)."""
    b, sep, p = value.partition(":")
    if not (sep and b.isdigit() and p.isdigit() and int(b) > 0 and int(p) > 0):
        raise argparse.ArgumentTypeError(f"{value!r} is not BATCH:PROMPT_TOKENS with two positive integers")
    return int(b), int(p)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct", help="a model folder or the embedded alias")
    ap.add_argument("--train", nargs="*", type=batch_prompt, default=[(16, 20), (64, 100), (16, 100), (64, 20)],
                    help="batch:prompt pairs")
    ap.add_argument("--classify", nargs="*", type=batch_prompt, default=[(16, 20), (64, 100)],
                    help="batch:prompt pairs")
    ap.add_argument("--steps", type=int, default=40, help="train batches counted (train_step's timed steps)")
    ap.add_argument("--warmup", type=int, default=5, help="train batches skipped first (its warm-up)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tflops", type=float, default=788.0, help="matrix rate for the floors, TFLOP/s")
    ap.add_argument("--ops", action="store_true", help="also count each train side's operator calls per step")
    args = ap.parse_args(argv)
    shape = Shape(SHAPES[args.shape])
    tok = load_base_model(args.tokenizer, "cpu")[1]
    ms = 1e3 / (args.tflops * 1e12)
    print(f"{args.shape}: {shape.body / 2e9:.3f} G multiply-adds per position in the linear layers, LM head "
          f"{shape.head / 2e9:.3f} G; floors at {args.tflops:.0f} TFLOP/s")
    for b, p in args.train:
        batches = make_batches(tok, args.steps + args.warmup, b, "cpu")[args.warmup:]
        f = train_flops(shape, batches, p)
        print(f"train batch {b}, {p} virtual tokens: " + ", ".join(
            f"{k} {v / 1e12:.1f} TFLOP ({v * ms:.1f} ms)" for k, v in f.items())
            + f"; peft/concat {f['peft'] / f['concat']:.2f}x, concat/shared_kv {f['concat'] / f['shared_kv']:.2f}x")
        if args.ops:
            print("  operator calls per step: " + ", ".join(
                f"{k} {v:.0f}" for k, v in op_counts(SHAPES[args.shape], tok, b, p).items()))
    texts = reviews(args.tasks * args.requests)
    lengths = [[len(source_ids(tok, t, bos=False)) for t in texts[k * args.requests:(k + 1) * args.requests]]
               for k in range(args.tasks)]
    for b, p in args.classify:
        f = classify_flops(shape, lengths, b, p)
        print(f"classify batch {b}, {p} virtual tokens, {args.tasks}x{args.requests} requests: " + ", ".join(
            f"{k} {v / 1e12:.2f} TFLOP ({v * ms:.1f} ms)" for k, v in f.items())
            + f"; peft/softprompt {f['peft'] / f['softprompt']:.2f}x")


if __name__ == "__main__":
    main()
