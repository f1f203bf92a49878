"""Method comparison harness: the same data, base model, loop and step budget for every method.

Prompt methods (prompt tuning with several inits and lengths, prefix tuning, P-tuning, deep prompts) and
weight methods (LoRA through PEFT, BitFit, full fine-tuning) all train with :func:`softprompt.train.train`:
a weight method is wrapped as a "method" whose parameters live inside the model and whose prompt is empty.
Each run happens in a fresh subprocess so its peak memory is its own (``VmHWM`` on Linux). The table has
trainable parameters, bytes per task on disk, peak memory, train time and test accuracy, and a PNG chart
plots accuracy against trainable parameters.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from softprompt.methods.base import PromptOutput


@dataclass
class Spec:
    """One row of the comparison: a label, a kind (a registered prompt method, or lora/bitfit/full) and config."""

    label: str
    kind: str
    config: dict = field(default_factory=dict)
    optimizer: str = "adafactor"
    lr: float = 0.3


DEFAULT_SPECS = [
    Spec("prompt tuning, random init, P=20", "prompt_tuning", {"num_virtual_tokens": 20, "init": "random"}),
    Spec("prompt tuning, sampled vocab, P=20", "prompt_tuning", {"num_virtual_tokens": 20, "init": "sample_vocab"}),
    Spec("prompt tuning, text init, P=5", "prompt_tuning", {"num_virtual_tokens": 5, "init": "text"}),
    Spec("prompt tuning, text init, P=20", "prompt_tuning", {"num_virtual_tokens": 20, "init": "text"}),
    Spec("prompt tuning, text init, P=50", "prompt_tuning", {"num_virtual_tokens": 50, "init": "text"}),
    Spec("prefix tuning, text init, P=10", "prefix_tuning", {"num_virtual_tokens": 10, "init": "text"},
         "adamw", 1e-3),
    Spec("P-tuning (MLP), P=20", "p_tuning", {"num_virtual_tokens": 20, "encoder": "mlp"}, "adamw", 1e-3),
    Spec("LoRA r=8 (q,v) via PEFT", "lora", {"r": 8, "alpha": 16}, "adamw", 1e-3),
    Spec("BitFit (biases)", "bitfit", {}, "adamw", 1e-3),
    Spec("full fine-tuning", "full", {}, "adamw", 1e-5),
]


class WeightTuning(nn.Module):
    """Trains parameters inside the model; no prompt. Fits the train loop's method interface."""

    name = "weights"

    def __init__(self, model, trainable: dict[str, nn.Parameter]):
        super().__init__()
        self._model = [model]  # not a submodule: state_dict holds only the trainable tensors
        self._names = list(trainable)
        self.params = nn.ParameterList(trainable.values())

    def forward(self) -> PromptOutput:
        return PromptOutput()

    def state_dict(self, *args, **kwargs):
        return {n: p.detach() for n, p in zip(self._names, self.params, strict=True)}

    def load_state_dict(self, state, strict: bool = True):
        with torch.no_grad():
            for n, p in zip(self._names, self.params, strict=True):
                p.copy_(state[n])

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def weight_method(model, spec: Spec) -> WeightTuning:
    """Unfreeze (or add, for LoRA) the parameters ``spec`` trains."""
    if spec.kind == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = [n for n in ("q_proj", "v_proj", "c_attn") if any(m.endswith(n) for m, _ in
                                                                    model.named_modules())]
        inject_adapter_in_model(LoraConfig(r=spec.config.get("r", 8), lora_alpha=spec.config.get("alpha", 16),
                                           target_modules=targets, lora_dropout=0.0), model)
        chosen = {n: p for n, p in model.named_parameters() if "lora_" in n}
    elif spec.kind == "bitfit":
        chosen = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    elif spec.kind == "full":
        chosen = dict(model.named_parameters())
    else:
        raise ValueError(f"unknown comparison kind {spec.kind!r}")
    if not chosen:
        raise ValueError(f"{spec.label}: this model has no parameters of that kind")
    for p in chosen.values():
        p.requires_grad_(True)
    return WeightTuning(model, chosen)


def context_problems(specs: list[Spec], model_name: str) -> list[str]:
    """The prompt specs that leave no room for text in the model's context (read from its config only)."""
    from softprompt.config import MIN_MAX_LENGTH
    from softprompt.model import context_length, load_model_config

    context = context_length(load_model_config(model_name))
    if context is None:
        return []
    limit, key = context
    problems = []
    for spec in specs:
        p = spec.config.get("num_virtual_tokens")
        if p is not None and limit - p < MIN_MAX_LENGTH:
            problems.append(f"{spec.label}: {p} virtual tokens leave {max(limit - p, 0)} positions for text in "
                            f"--model {model_name}'s context of {limit} positions ({key}); at least "
                            f"{MIN_MAX_LENGTH} are needed: choose a model with a longer context, or --only "
                            "kinds without prompts")
    return problems


def _peak_rss_mib() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_one(spec: Spec, model_name: str, dataset: str, steps: int, batch_size: int, test_samples: int,
            seed: int = 0) -> dict:
    """Train and evaluate one spec in this process; return its table row."""
    from softprompt.config import TrainArgs
    from softprompt.data import load_task
    from softprompt.evaluate import evaluate_prompt
    from softprompt.forward import family_of
    from softprompt.methods import build_method
    from softprompt.model import load_base_model
    from softprompt.store import save_prompt
    from softprompt.train import train

    model, tok = load_base_model(model_name)
    task = load_task(dataset, max_samples={"validation": 1, "test": test_samples})
    task.splits["validation"] = []
    if spec.kind in ("lora", "bitfit", "full"):
        method = weight_method(model, spec)
    else:
        method = build_method(spec.kind, {**spec.config, "seed": seed}, model, tok)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        # the divergence guard keeps two in-memory copies of the trained tensors and their optimizer state:
        # a few KiB for a prompt, about 3 GiB for full fine-tuning, which would swamp its peak-memory column
        train(model, tok, method, task, TrainArgs(output_dir=d, max_steps=steps, batch_size=batch_size,
                                                  optimizer=spec.optimizer, lr=spec.lr, warmup_steps=min(10, steps),
                                                  checkpoint_every=10**9, seed=seed, weight_decay=0.0,
                                                  divergence_guard=spec.kind != "full"))
        train_s = time.perf_counter() - t0
        if isinstance(method, WeightTuning):
            disk = sum(p.numel() * 4 for p in method.params)  # fp32 safetensors of the trained tensors
        else:
            folder = save_prompt(Path(d) / "saved", method, model)
            disk = sum(f.stat().st_size for f in folder.iterdir())
    model.eval()
    method.eval()
    with torch.no_grad():
        kv = family_of(model).inference_prompt(model, method()) if not isinstance(method, WeightTuning) else None
        metrics, _ = evaluate_prompt(model, tok, kv, task.examples("test"), task.format, with_loss=False)
    return {"method": spec.label, "kind": spec.kind, "trainable_params": method.num_trainable(),
            "bytes_per_task": disk, "peak_mib": _peak_rss_mib(), "train_s": round(train_s, 1),
            "accuracy": metrics.get("accuracy", metrics.get("exact_match")), "steps": steps}


def run_compare(specs: list[Spec], model_name: str, dataset: str, steps: int, batch_size: int,
                test_samples: int, out_dir: Path, log=print, keep_going: bool = False) -> list[dict]:
    """Run each spec in a fresh subprocess; write the table, ``compare.json`` and the chart to ``out_dir``.

    Args:
        specs: the methods to run, in order.
        model_name: base model (hub id or folder).
        dataset: dataset name or file.
        steps: training steps of every method.
        batch_size: training batch size.
        test_samples: test examples to evaluate on.
        out_dir: where ``compare.json`` (rewritten after every row), ``compare.md`` and ``compare.png`` go.
        log: called with each row's table line as it finishes.
        keep_going: run the specs after a failed one too; otherwise the first failure ends the run.

    Returns:
        One row per spec that ran; a failed run's row has ``error`` (the child's last stderr line) instead
        of results. The files are written either way, with the rows that ran.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in specs:
        job = json.dumps({"spec": spec.__dict__, "model": model_name, "dataset": dataset, "steps": steps,
                          "batch_size": batch_size, "test_samples": test_samples})
        proc = subprocess.run([sys.executable, "-m", "softprompt.compare", job], capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            # a child killed by a signal (e.g. out of memory) may leave no message: name its exit status
            tail = (proc.stderr.strip().splitlines() or [f"the run exited with status {proc.returncode}"])[-1]
            row = {"method": spec.label, "kind": spec.kind, "error": tail}
        else:
            row = json.loads(lines[-1])
        rows.append(row)
        log(format_row(row))
        (out_dir / "compare.json").write_text(json.dumps(rows, indent=2))
        if "error" in row and not keep_going:
            break
    (out_dir / "compare.md").write_text(format_table(rows))
    plot_compare(rows, out_dir / "compare.png")
    return rows


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['method']} | - | - | - | - | n/a: {row['error']} |"
    peak = f"{row['peak_mib']:.0f} MiB" if row.get("peak_mib") else "-"
    return (f"| {row['method']} | {row['trainable_params']:,} | {_size(row['bytes_per_task'])} | {peak} | "
            f"{row['train_s']:.0f} s | {row['accuracy']:.4f} |")


def format_table(rows: list[dict]) -> str:
    head = ("| method | trainable params | bytes per task | peak memory (RSS) | train time | test accuracy |\n"
            "|---|---|---|---|---|---|\n")
    return head + "\n".join(format_row(r) for r in rows) + "\n"


def format_failures(rows: list[dict], specs: list[Spec]) -> str | None:
    """The failed methods of ``rows`` with their errors, then ``specs`` not run; ``None`` when all ran."""
    failed = [r for r in rows if "error" in r]
    if not failed:
        return None
    not_run = [s.label for s in specs[len(rows):]]
    lines = [f"  {r['method']}: {r['error']}" for r in failed]
    if not_run:
        lines.append(f"  not run (the first failure stops the comparison; --keep-going runs them): "
                     f"{', '.join(not_run)}")
    return f"{len(failed)} of {len(specs)} methods failed:\n" + "\n".join(lines)


def plot_compare(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in ok:
        ax.scatter(r["trainable_params"], r["accuracy"], s=40)
        ax.annotate(r["method"], (r["trainable_params"], r["accuracy"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"same loop and budget ({ok[0]['steps']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # one run in a child process: print its row as the last stdout line
    job = json.loads(sys.argv[1])
    print(json.dumps(run_one(Spec(**job["spec"]), job["model"], job["dataset"], job["steps"], job["batch_size"],
                             job["test_samples"])))
