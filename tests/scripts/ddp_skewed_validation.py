"""Run by torchrun in tests/test_distributed.py: each rank measures other validation numbers (as non-deterministic
kernels may); with early stopping, the ranks must still stop at the same step (one stopping alone hung the rest)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import softprompt.train  # noqa: E402
from softprompt.train import distributed, train  # noqa: E402
from tests.conftest import make_tokenizer  # noqa: E402
from tests.test_train import args, fresh, uneven_task  # noqa: E402

out = Path(sys.argv[1])
rank, world = distributed()
torch.set_num_threads(1)
calls = []


def skewed(*a, **k):  # rank 0: never better after the first; rank 1: better every time
    calls.append(1)
    loss = 1.0 if rank == 0 else 1.0 / len(calls)
    return {"loss": loss, "perplexity": 2.0, "exact_match": 0.0, "f1": 0.0, "rouge_l": 0.0, "n": 4.0}, []


softprompt.train.evaluate_prompt = skewed
task = uneven_task()
task.splits["validation"] = task.splits["train"][:4]
model, method = fresh(make_tokenizer())
result = train(model, make_tokenizer(), method, task,
               args(out / "run", max_steps=12, optimizer="adamw", lr=0.05, batch_size=7, eval_every=3,
                    early_stopping_patience=1, metric="loss"))
(out / f"rank{rank}.json").write_text(json.dumps({"steps": result.steps, "stopped": result.stopped_early}))
