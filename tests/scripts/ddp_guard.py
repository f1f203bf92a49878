"""Run by torchrun in tests/test_train_guard.py: faults on rank 1 only; save each rank's prompt and guard result.

Rank 1's loss is NaN-gradient at step 4 and 20x at steps 13-15; rank 0's is untouched. Every rank must see
both (through the averaged gradients and loss) and take the same decisions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import softprompt.train as train_mod  # noqa: E402
from softprompt.forward import causal  # noqa: E402
from softprompt.train import distributed, train  # noqa: E402
from tests.conftest import make_tokenizer  # noqa: E402
from tests.test_train import args, fresh, task  # noqa: E402
from tests.test_train_guard import fault_hooks  # noqa: E402

out = Path(sys.argv[1])
rank, world = distributed()
torch.set_num_threads(1)
plan = {4: "nan_grad", 13: 20.0, 14: 20.0, 15: 20.0} if rank == 1 else {}
tracked, faulty = fault_hooks(plan)
train_mod.micro_batches, causal.target_loss = tracked, faulty
model, method = fresh(make_tokenizer())
result = train(model, make_tokenizer(), method, task(), args(out / "run", max_steps=18, batch_size=8, eval_every=9))
save_file({"prompt": method.embeddings.detach().contiguous()}, str(out / f"rank{rank}_of_{world}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps({"rollbacks": result.rollbacks, "lr_scale": result.lr_scale}))
