"""Run by torchrun in tests/test_distributed.py: data-parallel steps that leave a process without an example (a
global batch of 1, and a train split of 1 example), each rank's prompt saved per case."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from softprompt.data import TaskData  # noqa: E402
from softprompt.train import distributed, train  # noqa: E402
from tests.conftest import make_tokenizer  # noqa: E402
from tests.test_train import args, fresh, uneven_task  # noqa: E402

out = Path(sys.argv[1])
rank, world = distributed()
torch.set_num_threads(1)
one = uneven_task()
one = TaskData(one.format, {"train": one.splits["train"][:1]})
for case, data, batch_size in (("batch1", uneven_task(), 1), ("split1", one, 4)):
    model, method = fresh(make_tokenizer())
    train(model, make_tokenizer(), method, data, args(out / case, max_steps=4, optimizer="adamw", lr=0.05,
                                                      batch_size=batch_size, warmup_steps=0))
    save_file({"prompt": method.embeddings.detach().contiguous()}, str(out / f"{case}_rank{rank}.safetensors"))
