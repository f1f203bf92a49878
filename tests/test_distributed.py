"""Data-parallel training: a 2-process CPU run (gloo) keeps identical prompts and equals one process."""

from __future__ import annotations

from safetensors.torch import load_file

from softprompt.train import train
from tests.conftest import make_tokenizer, torchrun
from tests.test_train import args, fresh, uneven_task


def test_two_process_run_matches_on_both_ranks_and_a_single_process(tmp_path):
    proc = torchrun("ddp_train.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "rank0_of_2.safetensors"))["prompt"]
    r1 = load_file(str(tmp_path / "rank1_of_2.safetensors"))["prompt"]
    assert (r0 == r1).all()  # bit-identical on both ranks
    # one process on the whole batches: the ranks hold unequal shares (4 and 3 rows) of answers of unequal
    # lengths, and the step's loss is still the mean over every target token of the batch, so the updates agree
    model, method = fresh(make_tokenizer())
    train(model, make_tokenizer(), method, uneven_task(), args(tmp_path / "single", max_steps=6, optimizer="adamw",
                                                               lr=0.05, batch_size=7, eval_every=3))
    assert (method.embeddings.detach() - r0).abs().max() < 1e-4
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 6  # rank 0 alone wrote the log


def test_ranks_that_measure_other_validation_numbers_still_stop_together(tmp_path):
    # each rank validated on its own: rank 0 saw no better loss and stopped early at step 6 while rank 1, whose
    # numbers kept improving, went on into the next step's all-reduce and failed (or hung) there
    import json

    proc = torchrun("ddp_skewed_validation.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"steps": 6, "stopped": True}  # rank 0's numbers decide for both
