"""Data-parallel training: a 2-process CPU run (gloo) keeps identical prompts and equals one process."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from softprompt.data import TaskData
from softprompt.train import train
from tests.conftest import make_tokenizer, torchrun
from tests.test_train import args, fresh, full_batch_reference, uneven_task


def test_two_process_run_matches_on_both_ranks_and_a_single_process(tmp_path):
    proc = torchrun("ddp_train.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "rank0_of_2.safetensors"))["prompt"]
    r1 = load_file(str(tmp_path / "rank1_of_2.safetensors"))["prompt"]
    assert (r0 == r1).all()  # bit-identical on both ranks
    # one process on the whole batches: the ranks hold unequal shares (4 and 3 rows) of answers of unequal
    # lengths, and the step's loss is still the mean over every target token of the batch, so the updates agree
    model, method = fresh(make_tokenizer())
    a = args(tmp_path / "single", max_steps=6, optimizer="adamw", lr=0.05, batch_size=7, eval_every=3)
    loss, grad = full_batch_reference(model, make_tokenizer(), method, uneven_task(), a)
    train(model, make_tokenizer(), method, uneven_task(), a)
    assert (method.embeddings.detach() - r0).abs().max() < 1e-4
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 6  # rank 0 alone wrote the log
    # AdamW and clipping cancel a uniform scale of the gradient, so the prompts above would agree also if every
    # process summed its units instead of averaging; the first step's all-reduced loss and gradient norm are those
    # of the mean over the whole batch of 7 rows
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(loss, rel=1e-5)
    assert first["grad_norm"] == pytest.approx(float(grad.norm()), rel=1e-4)


def test_ranks_that_measure_other_validation_numbers_still_stop_together(tmp_path):
    # each rank validated on its own: rank 0 saw no better loss and stopped early at step 6 while rank 1, whose
    # numbers kept improving, went on into the next step's all-reduce and failed (or hung) there
    proc = torchrun("ddp_skewed_validation.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"steps": 6, "stopped": True}  # rank 0's numbers decide for both


def test_a_process_without_examples_contributes_nothing_and_the_ranks_agree(tmp_path):
    # a global batch of 1 (or a train split of 1 example) on 2 processes left rank 1 without an example: it had no
    # gradient, and the two ranks all-reduced different lists of tensors (a hang or a backend error)
    proc = torchrun("ddp_small_batch.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = uneven_task()
    one = TaskData(one.format, {"train": one.splits["train"][:1]})
    for case, data, batch_size in (("batch1", uneven_task(), 1), ("split1", one, 4)):
        r0 = load_file(str(tmp_path / f"{case}_rank0.safetensors"))["prompt"]
        r1 = load_file(str(tmp_path / f"{case}_rank1.safetensors"))["prompt"]
        assert (r0 == r1).all(), case
        model, method = fresh(make_tokenizer())
        start = method.embeddings.detach().clone()
        train(model, make_tokenizer(), method, data, args(tmp_path / f"single_{case}", max_steps=4,
                                                          optimizer="adamw", lr=0.05, batch_size=batch_size,
                                                          warmup_steps=0))
        assert (method.embeddings.detach() - start).abs().max() > 1e-3, case  # the prompt did train
        assert (method.embeddings.detach() - r0).abs().max() < 1e-5, case  # as one process trains it
