"""Run by torchrun in tests/test_distributed.py: train a tiny prompt data-parallel, save each rank's result."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from softprompt.train import distributed, train  # noqa: E402
from tests.conftest import make_tokenizer  # noqa: E402
from tests.test_train import args, fresh, uneven_task  # noqa: E402

out = Path(sys.argv[1])
rank, world = distributed()
torch.set_num_threads(1)
model, method = fresh(make_tokenizer())
# batch 7: 4 examples on rank 0 (micro-batches of 3 and 1), 3 on rank 1; answers of 1 to 4 tokens
train(model, make_tokenizer(), method, uneven_task(), args(out / "run", max_steps=6, optimizer="adamw", lr=0.05,
                                                           batch_size=7, eval_every=3))
save_file({"prompt": method.embeddings.detach().contiguous()}, str(out / f"rank{rank}_of_{world}.safetensors"))
