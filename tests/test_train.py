"""The training loop on a tiny model: learning, determinism, resume, logging, early stopping."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from softprompt import forward
from softprompt.config import TrainArgs
from softprompt.data import TaskData, TaskFormat
from softprompt.evaluate import evaluate_prompt
from softprompt.methods import build_method
from softprompt.plateau import cooldown_factor
from softprompt.schedule import lr_lambda, with_cooldown
from softprompt.train import epoch_order, train
from tests.conftest import make_model, sentiment_records

FMT = TaskFormat("Review: {text}\nSentiment:", "label", {"positive": "positive", "negative": "negative"})


def task(n_train=64, n_valid=16) -> TaskData:
    recs = sentiment_records(n_train + n_valid, seed=1)
    return TaskData(FMT, {"train": [FMT.render(r) for r in recs[:n_train]],
                          "validation": [FMT.render(r) for r in recs[n_train:]]})


def fresh(tokenizer, seed=0):
    model = make_model("llama", seed=seed)
    method = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "random", "init_scale": 0.1},
                          model, tokenizer)
    return model, method


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=12, batch_size=8, lr=0.3, warmup_steps=2, eval_every=6,
                checkpoint_every=4, seed=3)
    base.update(kw)
    return TrainArgs(**base)


def test_training_lowers_loss_and_logs(tmp_path, tokenizer):
    model, method = fresh(tokenizer)
    data = task()
    before, _ = evaluate_prompt(model, tokenizer, forward.compute_prompt_kv(model, method().embeds.detach()),
                                data.examples("validation"), FMT)
    result = train(model, tokenizer, method, data, args(tmp_path, max_steps=30, optimizer="adamw", lr=0.1))
    with torch.no_grad():
        after, _ = evaluate_prompt(model, tokenizer, forward.compute_prompt_kv(model, method()),
                                   data.examples("validation"), FMT)
    assert after["loss"] < before["loss"] - 0.1
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31)) and result.steps == 30
    first = rows[0]
    assert {"loss", "lr", "grad_norm", "grad_norm_per_token", "tokens_per_s", "epoch"} <= set(first)
    assert len(first["grad_norm_per_token"]) == 4
    assert "val_accuracy" in rows[5] and "val_loss" in rows[5] and "val_accuracy" not in rows[4]
    assert result.best_metric is not None and (tmp_path / "checkpoint" / "state.json").exists()
    # the base model did not move
    assert all(not p.requires_grad for p in model.parameters())
    assert torch.equal(model.lm_head.weight, make_model("llama").lm_head.weight)


def test_same_seed_same_prompt(tmp_path, tokenizer):
    outs = []
    for i in range(2):
        model, method = fresh(tokenizer)
        train(model, tokenizer, method, task(), args(tmp_path / str(i), max_steps=5))
        outs.append(method.embeddings.detach().clone())
    assert torch.equal(outs[0], outs[1])


class Killed(Exception):
    pass


def killed_at(kill_at, model, tokenizer, method, train_args, seen=None) -> bool:
    """Train, killed right after step ``kill_at`` (``None``: never); whether it was. ``seen`` gets the steps run."""
    def on_step(step):
        if seen is not None:
            seen.append(step)
        if step == kill_at:
            raise Killed

    try:
        train(model, tokenizer, method, task(), train_args, on_step=on_step)
    except Killed:
        return True
    return False


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_resume_after_kill_gives_identical_result(tmp_path, tokenizer, dropout, device):
    """A run killed mid-epoch, two steps past its last checkpoint, resumes to the uninterrupted result.

    By the kill, AdamW's moments, the linear schedule, the data position (mid-epoch) and, with dropout, the
    RNG (the CUDA one on a GPU) have all moved on from the checkpoint, so a resume that misses any of them
    ends elsewhere. The resumed process starts from another init, so a resume that ignores the checkpoint
    ends elsewhere too. On CPU the result is bit-identical (the same operations on the same values); CUDA
    kernels need not be, so there it is compared within a tolerance far below what a lost state costs.
    """
    tol = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 1e-5, "atol": 1e-6}

    def run(out, kill_at=None, resume=False, init_seed=0):
        model = make_model("llama").to(device)
        method = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "random", "dropout": dropout,
                                                "seed": init_seed}, model, tokenizer)
        steps = []
        # 64 examples in steps of 8: 8 steps an epoch; checkpoints at steps 5, 10 and 12
        if killed_at(kill_at, model, tokenizer, method, args(out, resume=resume, optimizer="adamw", lr=0.05,
                                                              schedule="linear", checkpoint_every=5), steps):
            return None, steps
        return method.embeddings.detach().cpu().clone(), steps

    straight, _ = run(tmp_path / "a")
    assert run(tmp_path / "b", kill_at=7) == (None, list(range(1, 8)))  # killed after step 7; checkpoint: 5
    resumed, steps = run(tmp_path / "b", resume=True, init_seed=1)
    assert steps == list(range(6, 13))  # it continued from the checkpoint rather than starting over
    torch.testing.assert_close(resumed, straight, **tol)
    restarted, _ = run(tmp_path / "c", init_seed=1)
    assert not torch.allclose(straight, restarted, atol=1e-3)  # what the checkpoint must make up for
    log_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, 13))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in log_b], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in log_a], dtype=torch.float64),
                               **tol)
    assert [r["lr"] for r in log_a] == [r["lr"] for r in log_b]


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_machine_without_one(tmp_path, tokenizer, monkeypatch):
    """The optimizer state of a GPU run is saved as CUDA tensors; resuming it on a CPU machine must work.

    The GPU side is simulated by tagging every tensor the checkpoint's ``torch.save`` writes as ``cuda:0``,
    which is what a run on a GPU writes; a plain ``torch.load`` of that file fails without CUDA.
    """
    import torch.serialization

    if torch.cuda.is_available():
        pytest.skip("simulates a machine without CUDA")

    def run(out, resume=False, kill_at=None):
        model, method = fresh(tokenizer)
        if killed_at(kill_at, model, tokenizer, method,
                     args(out, resume=resume, optimizer="adamw", lr=0.05, checkpoint_every=5)):
            return None
        return method.embeddings.detach().clone()

    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        assert run(tmp_path / "a", kill_at=7) is None  # checkpoint at step 5, its tensors tagged as on the GPU
    with pytest.raises(RuntimeError, match="CUDA"):  # what a loader without map_location meets
        torch.load(tmp_path / "a" / "checkpoint" / "optimizer.pt", weights_only=True)
    torch.testing.assert_close(run(tmp_path / "a", resume=True), run(tmp_path / "b"), rtol=0, atol=0)


def test_early_stopping(tmp_path, tokenizer):
    model, method = fresh(tokenizer)
    # a tiny lr cannot improve accuracy after the first evaluation; patience 1 stops at the second
    result = train(model, tokenizer, method, task(), args(tmp_path, max_steps=40, eval_every=2, lr=1e-9,
                                                          early_stopping_patience=1, metric="accuracy"))
    assert result.stopped_early and result.steps == 4 and result.best_step == 2


def test_stop_when_flat_cools_down_after_the_plateau_then_stops(tmp_path, tokenizer):
    model, method = fresh(tokenizer)
    # a tiny lr leaves the validation loss where it was: flat at the 7th evaluation (step 14, the rule held at
    # 12 and 14); then the lr falls to 0 over another third of the steps (5, rounded up to 6) and the run stops
    result = train(model, tokenizer, method, task(), args(tmp_path, max_steps=40, eval_every=2, lr=1e-9,
                                                          stop_when_flat=0.02))
    assert result.stopped_early and result.flat_step == 14 and result.steps == 20
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    schedule = lr_lambda(TrainArgs(output_dir=str(tmp_path), lr=1e-9, warmup_steps=2), 40)
    assert rows[13]["lr"] == pytest.approx(1e-9 * schedule(14))  # the schedule's lr up to the plateau
    cool = [r["lr"] / (1e-9 * schedule(r["step"])) for r in rows[14:]]
    assert cool == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])  # then linearly down to 0
    assert "val_loss" in rows[-1]  # the run ends with an evaluation
    # without the rule the same run goes on to its budget
    model, method = fresh(tokenizer)
    result = train(model, tokenizer, method, task(), args(tmp_path / "b", max_steps=16, eval_every=2, lr=1e-9))
    assert not result.stopped_early and result.flat_step is None and result.steps == 16


def test_stop_when_flat_keeps_its_curve_across_a_resume(tmp_path, tokenizer):
    def flat_args(name):
        return args(tmp_path / name, max_steps=40, eval_every=2, lr=1e-9, stop_when_flat=0.02, checkpoint_every=2)

    def killed_then_resumed(name, kill_at):
        def hook(step):
            if step == kill_at:
                raise KeyboardInterrupt

        model, method = fresh(tokenizer)
        with pytest.raises(KeyboardInterrupt):
            train(model, tokenizer, method, task(), flat_args(name), on_step=hook)
        model, method = fresh(tokenizer)
        return train(model, tokenizer, method, task(), TrainArgs(**{**flat_args(name).__dict__, "resume": True}))

    def lrs(name):
        return [json.loads(x)["lr"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    model, method = fresh(tokenizer)
    whole = train(model, tokenizer, method, task(), flat_args("a"))
    # killed before the plateau: the four evaluations before the kill count, the same plateau is found
    resumed = killed_then_resumed("b", 8)
    assert whole.flat_step == resumed.flat_step == 14 and whole.steps == resumed.steps == 20
    # killed during the cool-down: the resumed run keeps cooling down and stops where the whole run did
    resumed = killed_then_resumed("c", 16)
    assert resumed.flat_step == 14 and resumed.steps == 20 and lrs("c") == lrs("a")


def test_save_best_called_on_improvement(tmp_path, tokenizer):
    model, method = fresh(tokenizer)
    seen = []
    train(model, tokenizer, method, task(), args(tmp_path, metric="loss"), save_best=lambda m, met: seen.append(met))
    assert seen and all("val_loss" in m for m in seen)
    losses = [m["val_loss"] for m in seen]
    assert losses == sorted(losses, reverse=True)


def test_result_keeps_the_best_state_also_across_a_resume(tmp_path, tokenizer):
    model, method = fresh(tokenizer)
    saved = []

    def save_best(m, metrics):
        saved.append(({k: v.detach().clone() for k, v in m.state_dict().items()}, metrics))

    result = train(model, tokenizer, method, task(), args(tmp_path, max_steps=8, eval_every=2, metric="loss"),
                   save_best=save_best)
    state, metrics = saved[-1]  # save_best is told the step too
    assert {**result.best_metrics, "best_step": result.best_step} == metrics
    assert result.best_metric == metrics["val_loss"] and result.best_step == 8
    assert result.best_state.keys() == state.keys()
    assert all(t.device.type == "cpu" and torch.equal(t, state[k]) for k, t in result.best_state.items())
    with torch.no_grad():  # a copy: the live parameters moving on leave it alone
        method.embeddings.add_(1.0)
    assert torch.equal(result.best_state["embeddings"], state["embeddings"])
    # resuming the finished run trains nothing and still returns the best state (kept in the checkpoint)
    model, other = fresh(tokenizer)  # the initial prompt (the same base model: another one is refused)
    again = train(model, tokenizer, other, task(), args(tmp_path, max_steps=8, eval_every=2, metric="loss",
                                                        resume=True))
    assert again.history == [] and again.best_step == result.best_step and again.best_metrics == result.best_metrics
    assert all(torch.equal(t, state[k]) for k, t in again.best_state.items())
    # a checkpoint written before checkpoints kept the best state: the step is known, the state is not
    (tmp_path / "checkpoint" / "best.safetensors").unlink()
    legacy = train(model, tokenizer, other, task(), args(tmp_path, max_steps=8, eval_every=2, metric="loss",
                                                         resume=True))
    assert legacy.best_step == result.best_step and legacy.best_state is None


def test_auto_keeps_the_best_macro_f1_state_where_one_label_dominates_validation(tmp_path, tokenizer):
    recs = sentiment_records(64 + 32, seed=1)
    pos = [r for r in recs[64:] if r["label"] == "positive"]
    neg = [r for r in recs[64:] if r["label"] == "negative"]
    skewed = TaskData(FMT, {"train": [FMT.render(r) for r in recs[:64]],
                            "validation": [FMT.render(r) for r in pos[:12] + neg[:4]]})  # 75% positive
    kept = {}
    for metric in ("auto", "accuracy"):
        model, method = fresh(tokenizer)
        result = train(model, tokenizer, method, skewed, args(tmp_path / metric, eval_every=2, metric=metric))
        kept[metric] = result
        key = "val_macro_f1" if metric == "auto" else "val_accuracy"
        assert result.best_metric == result.best_metrics[key]
        evaluated = [r for r in result.history if key in r]
        assert result.best_metric == max(r[key] for r in evaluated)
    # the two selections read different numbers here, so the test tells them apart
    assert kept["auto"].best_metrics["val_macro_f1"] != kept["auto"].best_metrics["val_accuracy"]
    # a checkpoint of the same run written when auto read accuracy here: its best is re-read as a macro-F1
    state_file = tmp_path / "auto" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    state["best_metric"] = state["best_metrics"]["val_accuracy"]
    state_file.write_text(json.dumps(state))
    model, method = fresh(tokenizer)
    again = train(model, tokenizer, method, skewed, args(tmp_path / "auto", eval_every=2, max_steps=14, resume=True))
    assert again.best_metric == again.best_metrics["val_macro_f1"]
    seen = kept["auto"].history + again.history
    assert again.best_metric == max(r["val_macro_f1"] for r in seen if "val_macro_f1" in r)


def test_no_validation_no_best_state(tmp_path, tokenizer):
    model, method = fresh(tokenizer)
    result = train(model, tokenizer, method, task(n_valid=0), args(tmp_path, max_steps=2))
    assert result.best_step is None and result.best_state is None and result.best_metrics is None
    assert not (tmp_path / "checkpoint" / "best.safetensors").exists()


def full_batch_reference(model, tokenizer, method, data: TaskData, train_args: TrainArgs,
                         max_length: int = 256) -> tuple[float, torch.Tensor]:
    """The mean cross-entropy over every target token of the first step's whole batch, and its gradient with
    respect to the prompt, computed in one HF forward over ``[prompt embeddings, token embeddings]`` (right-padded
    rows): what the loop's first step must log as its loss and have as its prompt gradient before clipping."""
    from softprompt.data import collate
    from softprompt.forward import family_of
    from softprompt.train import step_groups

    enc = family_of(model).encode_examples(tokenizer, data.examples("train"), data.format, max_length)
    per_step = train_args.batch_size * train_args.grad_accum
    batch = collate([enc[i] for i in step_groups(enc, train_args, 0, len(enc) // per_step)[0]],
                    tokenizer.pad_token_id)
    prompt = method.embeddings.detach().clone().requires_grad_()
    rows, p = batch.input_ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.expand(rows, -1, -1), model.get_input_embeddings()(batch.input_ids)], dim=1)
    mask = torch.cat([torch.ones(rows, p, dtype=torch.long), batch.attention_mask], dim=1)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, p:]
    sel = batch.target_mask[:, 1:]  # token t is predicted at position t - 1
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][sel].float(), batch.input_ids[:, 1:][sel])
    (grad,) = torch.autograd.grad(loss, prompt)
    return float(loss.detach()), grad


@pytest.fixture
def grads_before_clipping(monkeypatch) -> list[list[torch.Tensor]]:
    """Copies of the gradients every ``clip_grad_norm_`` call is given (the loop's, before it clips them)."""
    seen, real = [], torch.nn.utils.clip_grad_norm_

    def spy(params, *a, **kw):
        params = list(params)
        seen.append([p.grad.detach().clone() for p in params if p.grad is not None])
        return real(params, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return seen


def assert_first_step_is_the_full_batch_mean(out, grads, reference) -> None:
    """The first logged loss and the first step's gradient are those of the mean over the whole batch: AdamW and
    clipping cancel a uniform scale of the gradient, so equal final prompts do not show a summed (or otherwise
    rescaled) loss; these numbers do."""
    loss, grad = reference
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(loss, rel=1e-5)
    assert first["grad_norm"] == pytest.approx(float(grad.norm()), rel=1e-4)
    torch.testing.assert_close(grads[0][0], grad, atol=1e-6, rtol=1e-4)


def test_grad_accumulation_matches_big_batch(tmp_path, tokenizer, grads_before_clipping):
    results = []
    for bs, acc in ((8, 1), (4, 2)):
        model, method = fresh(tokenizer)
        a = args(tmp_path / f"{bs}", max_steps=3, batch_size=bs, grad_accum=acc, optimizer="adamw", lr=0.01)
        reference = full_batch_reference(model, tokenizer, method, task(), a)
        grads_before_clipping.clear()
        train(model, tokenizer, method, task(), a)
        assert_first_step_is_the_full_batch_mean(tmp_path / f"{bs}", grads_before_clipping, reference)
        results.append(method.embeddings.detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def uneven_task(n_train=64) -> TaskData:
    """A generation task whose answers are 1 to 4 tokens (+ EOS): micro-batches hold unequal target counts."""
    import random

    rng = random.Random(5)
    fmt = TaskFormat("Review: {text}\nSentiment:", "answer")
    answers = ["good", "very good", "not a good film", "awful", "the plot was bad"]
    fill = ["the", "movie", "was", "a", "plot", "very"]
    recs = [{"text": " ".join(rng.choice(fill) for _ in range(rng.randint(1, 6))), "answer": " " + rng.choice(answers)}
            for _ in range(n_train)]
    return TaskData(fmt, {"train": [fmt.render(r) for r in recs]})


@pytest.mark.parametrize("group_by_length", [True, False])
def test_grad_accumulation_matches_big_batch_with_unequal_targets(tmp_path, tokenizer, group_by_length,
                                                                  grads_before_clipping):
    """The step's loss is the mean over all its target tokens, however the batch is cut into micro-batches:
    averaging the micro-batches' means weighed a token of a short-answer micro-batch more."""
    results = []
    for bs, acc in ((8, 1), (2, 4)):
        model, method = fresh(tokenizer)
        a = args(tmp_path / f"{bs}", max_steps=3, batch_size=bs, grad_accum=acc, optimizer="adamw", lr=0.05,
                 warmup_steps=0, group_by_length=group_by_length)
        reference = full_batch_reference(model, tokenizer, method, uneven_task(), a)
        grads_before_clipping.clear()
        train(model, tokenizer, method, uneven_task(), a)
        assert_first_step_is_the_full_batch_mean(tmp_path / f"{bs}", grads_before_clipping, reference)
        results.append(method.embeddings.detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_schedule_and_epoch_order():
    a = TrainArgs(warmup_steps=4, schedule="linear")
    f = lr_lambda(a, 14)
    assert [round(f(s), 3) for s in (0, 3, 4, 9, 14)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    c = lr_lambda(TrainArgs(warmup_steps=0, schedule="cosine"), 10)
    assert round(c(5), 6) == 0.5
    # warmup-stable-decay: constant after the warmup, then linear to 0 over the last quarter of the steps
    w = lr_lambda(TrainArgs(warmup_steps=4, schedule="wsd"), 20)
    assert [round(w(s), 3) for s in (0, 3, 4, 14, 15, 17, 19, 20)] == [0.25, 1.0, 1.0, 1.0, 1.0, 0.6, 0.2, 0.0]
    w = lr_lambda(TrainArgs(warmup_steps=10, schedule="wsd"), 12)  # the decay never starts before the warmup ends
    assert [round(w(s), 3) for s in (9, 10, 11)] == [1.0, 1.0, 0.5]


def test_the_plateau_cool_down_replaces_the_wsd_decay():
    # multiplied, a plateau at step 60 of 100 (wsd decays from 75) gave 0.2 x 0.96 at step 76, not the linear 0.2:
    # the cool-down fell faster than linearly, and the same run with more steps cooled down otherwise
    args = TrainArgs(warmup_steps=0, schedule="wsd")
    f = lr_lambda(args, 100)

    def lrs(flat, stop):
        return [with_cooldown(args, f(s), cooldown_factor(s, flat, stop)) for s in range(100)]

    lr = lrs(60, 80)  # the cool-down ends inside wsd's decay: linear from 1 at step 60 to 0 at step 80
    assert lr[:60] == [1.0] * 60 and lr[60:80] == pytest.approx([(80 - s) / 20 for s in range(60, 80)])
    assert lr[80:] == [0.0] * 20
    lr = lrs(84, 100)  # a plateau found inside the decay: the decay goes on as before
    assert lr[84:] == pytest.approx([(100 - s) / 25 for s in range(84, 100)])
    linear = TrainArgs(warmup_steps=0, schedule="linear")  # the other schedules: the cool-down scales the decay
    assert with_cooldown(linear, 0.6, 0.5) == 0.3 and with_cooldown(args, 0.6, 0.5) == 0.5
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 1, 0)) == list(range(10))


def test_step_groups_cover_each_example_once_and_group_lengths(tokenizer):
    from softprompt.data import Encoded
    from softprompt.train import step_groups

    enc = [Encoded(list(range(3 + (i * 7) % 23)), 2) for i in range(64)]
    a = TrainArgs(batch_size=4, group_by_length=True, seed=1)
    groups = step_groups(enc, a, 0, 16)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(64))
    assert groups == step_groups(enc, a, 0, 16) != step_groups(enc, a, 1, 16)
    spread = sum(max(len(enc[i].input_ids) for i in g) - min(len(enc[i].input_ids) for i in g) for g in groups)
    plain = step_groups(enc, TrainArgs(batch_size=4, group_by_length=False, seed=1), 0, 16)
    plain_spread = sum(max(len(enc[i].input_ids) for i in g) - min(len(enc[i].input_ids) for i in g) for g in plain)
    assert spread < plain_spread / 3


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_training_works_on_each_architecture(tmp_path, tokenizer, kind):
    model = make_model(kind)
    method = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "sample_vocab"}, model, tokenizer)
    start = method.embeddings.detach().clone()
    data = task(n_train=32, n_valid=8)
    result = train(model, tokenizer, method, data, args(tmp_path, max_steps=4, eval_every=4, optimizer="adamw",
                                                        lr=0.05))
    assert result.steps == 4 and result.best_metric is not None
    assert not torch.equal(start, method.embeddings.detach())
    assert all(p.grad is None for p in model.parameters())


def test_concat_and_shared_kv_passes_train_the_same_prompt(tmp_path, tokenizer):
    finals = []
    for prompt_pass in ("shared_kv", "concat"):
        model, method = fresh(tokenizer)
        train(model, tokenizer, method, task(), args(tmp_path / prompt_pass, max_steps=5, optimizer="adamw",
                                                     lr=0.05, prompt_pass=prompt_pass))
        finals.append(method.embeddings.detach().clone())
    torch.testing.assert_close(finals[0], finals[1], atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_trains_the_same_prompt(tmp_path, tokenizer):
    finals = []
    for ckpt in (False, True):
        model, method = fresh(tokenizer)
        train(model, tokenizer, method, task(), args(tmp_path / str(ckpt), max_steps=4, optimizer="adamw", lr=0.05,
                                                     gradient_checkpointing=ckpt))
        finals.append(method.embeddings.detach().clone())
        assert model.is_gradient_checkpointing == ckpt
    torch.testing.assert_close(finals[0], finals[1], atol=1e-5, rtol=1e-5)


def test_resuming_a_run_that_stopped_early_leaves_it_stopped(tmp_path, tokenizer):
    """A run ended by early stopping (or the cool-down, or the guard) and resumed (e.g. after a kill during
    its final evaluation) trained on from the stop: its prompt and logs then differed from the run itself."""
    a = args(tmp_path / "run", max_steps=20, eval_every=2, early_stopping_patience=1, lr=1e-12, optimizer="adamw",
             metric="loss")
    model, method = fresh(tokenizer)
    first = train(model, tokenizer, method, task(), a)
    assert first.stopped_early and first.steps == 4
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    model, method2 = fresh(tokenizer)
    again = train(model, tokenizer, method2, task(), dataclasses.replace(a, resume=True))
    assert again.stopped_early and again.steps == 4 and not again.history
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == log
    assert torch.equal(method2.embeddings, method.embeddings)


def test_gradient_checkpointing_leaves_no_dropout_in_a_model_that_keeps_its_rates_as_floats():
    """OPT and BART apply F.dropout(p=self.dropout, training=self.training) with rates copied into plain floats:
    switched to training mode for checkpointing, the frozen model dropped 10% of its activations."""
    from transformers import OPTConfig, OPTForCausalLM

    from softprompt.model import prepare_frozen
    from softprompt.train import _enable_checkpointing

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                                     dropout=0.5, attention_dropout=0.5, activation_dropout=0.5))
    prepare_frozen(model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    _enable_checkpointing(model)
    assert model.training
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference)


def test_a_fresh_run_in_a_used_folder_drops_the_earlier_runs_checkpoint(tmp_path, tokenizer):
    """A run started without --resume in a finished run's folder and killed before its first checkpoint left
    the earlier run's checkpoint: a --resume then continued (or ended) that other run and saved its prompt."""
    model, method = fresh(tokenizer)
    train(model, tokenizer, method, task(), args(tmp_path, max_steps=8))
    assert (tmp_path / "checkpoint" / "state.json").exists()
    model, method = fresh(tokenizer)
    assert killed_at(1, model, tokenizer, method, args(tmp_path, max_steps=8, checkpoint_every=4, lr=0.01))
    assert not (tmp_path / "checkpoint").exists()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    model, method = fresh(tokenizer)
    steps = []
    killed_at(None, model, tokenizer, method, args(tmp_path, max_steps=8, checkpoint_every=4, lr=0.01, resume=True),
              steps)
    assert steps == list(range(1, 9))  # nothing to resume: it trained from the start


def test_the_k_shot_row_is_named_for_the_shots_it_holds(tokenizer):
    # with fewer training examples than --k-shot, the row read "4-shot prompting" over 3 shots
    from softprompt.config import DataArgs, EvalArgs
    from softprompt.workflows.baselines import evaluate_with_baselines

    data = task(3, 4)
    args = {"eval": EvalArgs(k_shot=4, baselines=["k_shot"]), "data": DataArgs(max_length=64)}
    report = evaluate_with_baselines(make_model("llama"), tokenizer, data, args, "", data.examples("validation"))
    assert list(report) == ["3-shot prompting"]
    args["eval"] = EvalArgs(k_shot=2, baselines=["k_shot"])
    assert list(evaluate_with_baselines(make_model("llama"), tokenizer, data, args, "",
                                        data.examples("validation"))) == ["2-shot prompting"]


def test_a_train_split_that_encodes_to_nothing_is_refused_not_trained_as_no_op(tmp_path, tokenizer):
    """One-token documents make no LM window: every step did nothing, the run ended
    normally and its initial prompt was saved as trained."""
    from softprompt.data import DataError, Example
    from softprompt.data.corpus import CorpusFormat

    model, method = fresh(tokenizer)
    data = TaskData(CorpusFormat(note="x"), {"train": [Example("", w) for w in ("good", "bad", "film")]})
    with pytest.raises(DataError, match="train split: no example is left to train on once encoded"):
        train(model, tokenizer, method, data, args(tmp_path, max_steps=3))


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, tokenizer, caplog):
    """--warmup-steps at or above the run's steps: the lr never reached its peak nor decayed, and nothing said so.
    The schedule stays as asked; the console and the first line of metrics.jsonl name both numbers."""
    model, method = fresh(tokenizer)
    with caplog.at_level("WARNING", logger="softprompt"):
        train(model, tokenizer, method, task(), args(tmp_path / "long", max_steps=4, warmup_steps=6,
                                                     schedule="linear", optimizer="adamw", lr=0.1))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "--warmup-steps 6 >= the run's 4 steps" in warned[0], warned
    assert "decay never starts" in warned[0]
    rows = [json.loads(x) for x in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["warning"] == warned[0] and not any("warning" in r for r in rows[1:])
    assert [r["lr"] for r in rows] == pytest.approx([0.1 * s / 6 for s in (2, 3, 4, 5)])  # the schedule as asked
    caplog.clear()
    model, method = fresh(tokenizer)
    with caplog.at_level("WARNING", logger="softprompt"):
        train(model, tokenizer, method, task(), args(tmp_path / "short", max_steps=4, warmup_steps=3))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert not any("warning" in json.loads(x) for x in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines())


def test_a_resume_that_grows_the_run_continues_a_cut_cool_down(tmp_path, tokenizer, monkeypatch):
    """A plateau's cool-down is cut at the run's last step. Resumed with more --max-steps, the run ran one step at
    lr 0 (the cool-down's end was the old last step) and stopped; it now continues the cool-down to its own end,
    and a cool-down that had come to its end stays over."""
    def run(name, max_steps, resume=False):
        model, method = fresh(tokenizer)
        result = train(model, tokenizer, method, task(), args(tmp_path / name, max_steps=max_steps, eval_every=2,
                                                              lr=1e-9, stop_when_flat=0.02, resume=resume,
                                                              schedule="constant"))  # the lr: the cool-down's
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return result, {r["step"]: r["lr"] for r in rows}

    # the same run as test_stop_when_flat_keeps_its_curve_across_a_resume: flat at step 14, cool-down to step 20
    cut, lrs = run("cut", 17)
    assert cut.flat_step == 14 and cut.steps == 17 and lrs[17] == 0.0
    import softprompt.train as train_mod

    used, build = [], train_mod.build_optimizer

    def recording(params, train_args):  # the lr each step of the resumed run takes
        opt = build(params, train_args)
        opt.register_step_pre_hook(lambda o, *_: used.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(train_mod, "build_optimizer", recording)
    grown, lrs = run("cut", 40, resume=True)
    assert grown.flat_step == 14 and grown.steps == 20 and grown.stopped_early
    assert used == pytest.approx([1e-9 * 3 / 6, 1e-9 * 2 / 6, 1e-9 / 6], abs=1e-15)  # steps 18 to 20
    # row k logs the lr of step k + 1: steps 19 and 20 at the cool-down's lr of 14..20, not at 0
    assert lrs[18] == pytest.approx(1e-9 * 2 / 6) and lrs[19] == pytest.approx(1e-9 / 6) and lrs[20] == 0.0
    whole, _ = run("whole", 20)  # its cool-down ends at its last step: over, whatever the resume asks
    assert whole.flat_step == 14 and whole.steps == 20
    again, _ = run("whole", 40, resume=True)
    assert again.history == [] and again.steps == 20
