"""Training-step throughput and peak memory: softprompt vs PEFT PromptTuning, side by side.

Same base model, same batches (batch 16 of Rotten Tomatoes reviews cut to <= 48 tokens, one-token targets),
20 virtual tokens, same optimizer (Adafactor, lr 0.3). Three sides, so that the gain can be split by source:

- ``peft``: PEFT as usually written, ``labels=`` to the model: the LM head runs at every position, a
  ``(B, P+T, V)`` fp32 logits tensor;
- ``peft_targets``: PEFT with the loss computed only where there are targets: ``logits_to_keep`` with the
  positions that predict a target token (HF keeps the same positions for every row, so ``K`` = the distinct
  target positions of the batch), cross-entropy on those rows. Against ``peft`` it shows what the LM head
  costs; against ``softprompt`` what sharing the prompt's keys/values across the batch saves;
- ``softprompt``: the prompt run once per batch, its keys/values shared by every row (``shared_kv``; on
  CUDA the default is one concatenated pass, ``concat``, the prompt in front of every row as PEFT runs it),
  LM head only at target positions. The pass actually used is printed, and the ratio against
  ``peft_targets`` is credited to sharing the prompt only when it is ``shared_kv``.

Steps rotate between the sides so that machine noise hits all alike. Throughput is the timed tokens over the
summed step times; beside it, the median over batches of each batch's step-time ratio (every side runs every
batch), which a few slow steps do not move. Before timing, every side computes the
loss of one batch from the same prompt and its gradient with respect to the prompt (one backward, what
every timed step runs before the update), and both are compared with an independent reference: each row
on its own through the plain model, prompt embeddings in front of its text, cross-entropy at its targets.
The benchmark stops with exit status 1 if a side's loss differs (more than 1e-4 relative in float32, 2e-2
in half precision) or its prompt gradient does (largest difference over the reference's largest entry:
1e-3 in float32, 5e-2 in half precision).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during each step minus what was allocated before
it (weights and optimizer state excluded). On CPU, each side runs
a few steps in a fresh subprocess that resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
after warm-up and reads ``VmHWM`` afterwards: the extra resident memory a training step needs.

    python benchmarks/train_step.py                 # default embedded model, 20 timed steps per side
    python benchmarks/train_step.py --steps 40 --model path/or/hub-id
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from softprompt.data import collate, encode, load_task
from softprompt.forward import causal
from softprompt.methods import build_method
from softprompt.model import DEFAULT_MODEL, load_base_model

P = 20
MAX_TOKENS = 48


def make_batches(tok, n_batches: int, batch_size: int, device) -> list:
    """``n_batches`` right-padded batches of reviews (source cut from the left to fit MAX_TOKENS)."""
    task = load_task("rotten_tomatoes")
    enc = encode(tok, task.examples("train")[: n_batches * batch_size], max_length=MAX_TOKENS)
    return [collate(enc[i * batch_size:(i + 1) * batch_size], tok.pad_token_id).to(device) for i in range(n_batches)]


def reference_loss_and_grad(model, batch, prompt: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy over all target tokens of ``batch`` and its gradient w.r.t. the ``(P, H)`` prompt,
    each row alone through the plain model: prompt embeddings + its real tokens, no padding, no cache."""
    prompt = prompt.detach().clone().requires_grad_(True)
    emb = model.get_input_embeddings()
    n = int(batch.target_mask.sum())
    total = 0.0
    for ids, mask, target in zip(batch.input_ids, batch.attention_mask.bool(), batch.target_mask, strict=True):
        t = int(mask.sum())  # right padding: the real tokens come first
        x = torch.cat([prompt.to(model.dtype)[None], emb(ids[None, :t])], 1)  # (1, P+t, H)
        logits = model(inputs_embeds=x).logits[0, prompt.shape[0] - 1:-1].float()  # (t, V): predicts ids[0:t]
        cols = target[:t].nonzero()[:, 0]
        loss = torch.nn.functional.cross_entropy(logits[cols], ids[cols], reduction="sum") / n
        loss.backward()
        total += float(loss.detach())
    return total, prompt.grad.float()


class Ours:
    name = "softprompt"

    def __init__(self, model, tok, prompt_pass="auto", p: int = P):
        self.model = model
        self.prompt_pass = prompt_pass
        self.pass_used: str | None = None  # what ``prompt_pass`` resolved to (``auto``: concat on CUDA)
        self.method = build_method("prompt_tuning", {"num_virtual_tokens": p, "init": "random"}, model, tok)
        self.method.to(model.device).train()
        self.opt = torch.optim.Adafactor(self.method.parameters(), lr=0.3)

    def set_prompt(self, emb):
        self.method.embeddings.data.copy_(emb)

    def prompt_grad(self) -> torch.Tensor:
        return self.method.embeddings.grad

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def loss(self, batch):
        prompt = causal.prompt_for_step(self.model, self.method(), self.prompt_pass)
        self.pass_used = "concat" if isinstance(prompt, torch.Tensor) else "shared_kv"  # embeddings or keys/values
        return causal.target_loss(self.model, batch, prompt)

    def step(self, batch):
        self.loss(batch).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Peft:
    name = "peft"

    def __init__(self, model, p: int = P):
        from peft import PromptTuningConfig, get_peft_model

        self.p = p
        self.model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adafactor(self.params, lr=0.3)

    def set_prompt(self, emb):
        self.params[0].data.copy_(emb)

    def prompt_grad(self) -> torch.Tensor:
        return self.params[0].grad

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def loss(self, batch):
        labels = batch.input_ids.masked_fill(~batch.target_mask, -100)  # PEFT prepends -100 for the prompt
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss

    def step(self, batch):
        self.loss(batch).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class PeftTargets(Peft):
    """PEFT with the LM head only at the positions that predict a target token."""

    name = "peft_targets"

    def loss(self, batch):
        rows, cols = batch.target_mask.nonzero(as_tuple=True)  # target tokens in the text
        # the logits at text position t-1 predict token t; PEFT's sequence starts with the P virtual tokens
        keep, col = torch.unique(cols - 1 + self.p, return_inverse=True)  # (K,) positions kept for every row
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            logits_to_keep=keep).logits  # (B, K, V)
        return torch.nn.functional.cross_entropy(logits[rows, col].float(), batch.input_ids[rows, cols])


SIDES = {"softprompt": Ours, "peft": Peft, "peft_targets": PeftTargets}


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over batches of ``times[i] / base[i]`` (both sides ran batch ``i``): unlike the ratio of the totals,
    a few slow steps (on a GPU, a new shape's first kernels) do not move it."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(side: str, args) -> None:
    """Run in a fresh process: warm up, reset the peak-RSS counter, run steps, print the peak increase."""
    model, tok = load_base_model(args.model, args.device, args.dtype)
    batches = make_batches(tok, 4, args.batch_size, model.device)
    impl = (Ours(model, tok, args.prompt_pass, args.prompt_tokens) if side == "softprompt"
            else SIDES[side](model, args.prompt_tokens))
    impl.step(batches[0])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = rss_kib("VmRSS")
    for b in batches[1:]:
        impl.step(b)
    print(json.dumps({"side": side, "peak_extra_mib": (rss_kib("VmHWM") - base) / 1024}))


def check_sides(model, sides: list, batch) -> None:
    """Each side's loss and prompt gradient on ``batch`` against :func:`reference_loss_and_grad`; exit 1 on a
    difference (nothing is timed then). The gradients are cleared again: timing starts from the same state."""
    ref_loss, ref_grad = reference_loss_and_grad(model, batch, sides[0].method.embeddings)
    losses, grads = {}, {}
    for impl in sides:
        loss = impl.loss(batch)
        loss.backward()
        losses[impl.name] = float(loss.detach())
        grads[impl.name] = float((impl.prompt_grad().float() - ref_grad).abs().max() / ref_grad.abs().max())
        impl.zero_grad()
    half = model.dtype != torch.float32
    worst = max(abs(v - ref_loss) for v in losses.values())
    print(f"same-prompt loss on batch 0: reference {ref_loss:.6f}  "
          + "  ".join(f"{k} {v:.6f}" for k, v in losses.items()) + f"  (|diff| {worst:.2e})")
    print("prompt gradient on batch 0, largest difference from the reference's over its largest entry: "
          + "  ".join(f"{k} {v:.2e}" for k, v in grads.items()))
    tol = (2e-2 if half else 1e-4) * max(1.0, abs(ref_loss))
    bad = [k for k, v in losses.items() if abs(v - ref_loss) > tol]
    if bad:
        print(f"the sides compute different losses from the same prompt: {', '.join(bad)} not the reference's "
              f"(|diff| {worst:.2e} > {tol:.1e}); not timing them", file=sys.stderr)
        sys.exit(1)
    grad_tol = 5e-2 if half else 1e-3
    bad = [f"{k} ({v:.2e})" for k, v in grads.items() if v > grad_tol]
    if bad:
        print(f"the sides compute different prompt gradients from the same prompt: {', '.join(bad)} not the "
              f"reference's (relative difference > {grad_tol:.0e}); not timing them", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=P)
    ap.add_argument("--prompt-pass", default="auto", choices=["auto", "shared_kv", "concat"],
                    help="softprompt's training pass (auto: concat on CUDA, shared_kv elsewhere)")
    ap.add_argument("--memory-child", choices=list(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return

    model_a, tok = load_base_model(args.model, args.device, args.dtype)
    dev = model_a.device
    batches = make_batches(tok, args.steps + args.warmup, args.batch_size, dev)
    ours = Ours(model_a, tok, args.prompt_pass, args.prompt_tokens)
    # PEFT wraps its model in place: a model of its own for each PEFT side
    sides = [ours] + [cls(load_base_model(args.model, args.device, args.dtype)[0], args.prompt_tokens)
                      for cls in (Peft, PeftTargets)]
    for impl in sides[1:]:
        impl.set_prompt(ours.method.embeddings.detach())
    print(f"model {args.model} on {dev} ({model_a.dtype}); batch {args.batch_size}, <= {MAX_TOKENS} tokens, "
          f"{args.prompt_tokens} virtual tokens")
    check_sides(model_a, sides, batches[0])
    print(f"softprompt prompt pass: {ours.pass_used} (--prompt-pass {args.prompt_pass})")

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {impl.name: [] for impl in sides}
    mem: dict[str, float] = {}
    tokens = [int(b.attention_mask.sum()) for b in batches]
    for i, batch in enumerate(batches):
        for impl in sides[i % 3:] + sides[:i % 3]:  # rotate who goes first
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            sync()
            t0 = time.perf_counter()
            impl.step(batch)
            sync()
            if i >= args.warmup:
                times[impl.name].append(time.perf_counter() - t0)
            if dev.type == "cuda":
                extra = (torch.cuda.max_memory_allocated() - before) / 2**20
                mem[impl.name] = max(mem.get(impl.name, 0.0), extra)
    timed_tokens = sum(tokens[args.warmup:])
    tps = {k: timed_tokens / sum(v) for k, v in times.items()}
    if dev.type != "cuda":
        for side in SIDES:
            out = subprocess.run([sys.executable, __file__, "--memory-child", side, "--model", args.model,
                                  "--device", args.device, "--dtype", args.dtype,
                                  "--batch-size", str(args.batch_size), "--prompt-pass", args.prompt_pass,
                                  "--prompt-tokens", str(args.prompt_tokens)],
                                 capture_output=True, text=True, check=True)
            mem[side] = json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]
    label = "peak extra GPU memory in a step" if dev.type == "cuda" else "peak extra RSS during steps"
    print(f"\n{'':12}{'tok/s':>10}{'median step s':>15}{label + ' (MiB)':>40}")
    for k in times:
        print(f"{k:12}{tps[k]:>10.1f}{statistics.median(times[k]):>15.3f}{mem[k]:>40.1f}")
    source = ("from sharing the prompt" if ours.pass_used == "shared_kv" else
              "both run the prompt with every row, the concat pass")
    print(f"\nthroughput ratio softprompt/peft: {tps['softprompt'] / tps['peft']:.2f}x   (softprompt/peft_targets, "
          f"{source}: {tps['softprompt'] / tps['peft_targets']:.2f}x; peft_targets/peft, from the LM "
          f"head at targets only: {tps['peft_targets'] / tps['peft']:.2f}x)")
    paired = {k: paired_ratio(times[k], times["softprompt"]) for k in ("peft", "peft_targets")}
    print(f"median per-batch step-time ratio peft/softprompt: {paired['peft']:.2f}x   (peft_targets/softprompt: "
          f"{paired['peft_targets']:.2f}x)")
    print(f"memory ratio softprompt/peft:     {mem['softprompt'] / mem['peft']:.2f}x   (softprompt/peft_targets: "
          f"{mem['softprompt'] / mem['peft_targets']:.2f}x)")


if __name__ == "__main__":
    main()
