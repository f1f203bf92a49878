"""The divergence guard of the training loop: detection rule, rollback, stop, resume, flags.

Tiny random models barely move their loss, so divergence is injected: ``faults`` wraps the loss of chosen
steps (a NaN loss, a NaN gradient behind a finite loss, or the loss times a factor, which also scales its
gradient), keyed by the step the loop is on, so a resumed run sees the same faults at the same steps.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import softprompt.train as train_mod
from softprompt.config import ConfigError, TrainArgs
from softprompt.forward import causal
from softprompt.guard import DivergenceGuard
from softprompt.methods import build_method
from softprompt.train import train
from tests import test_cli
from tests.conftest import make_model, torchrun
from tests.test_cli import run, train_argv
from tests.test_train import Killed, args, fresh, task

# losses logged by two real runs of the default model (Rotten Tomatoes, batch 16, Adafactor lr 0.3):
# the main command's 100 steps (healthy: 0.855 validation accuracy despite the spikes at steps 15 and 20),
# and compare's prompt tuning with P=50 (60 steps), which collapsed to the majority class after steps 19-24
MAIN = [2.681, 2.028, 1.817, 1.035, 0.885, 1.345, 0.822, 2.32, 1.879, 1.232, 1.186, 1.642, 0.723, 0.935, 9.051,
        1.943, 0.997, 1.083, 1.133, 5.991, 0.806, 0.739, 0.921, 1.357, 0.896, 0.601, 0.704, 0.7, 0.536, 0.746,
        1.184, 0.939, 0.567, 0.74, 1.039, 1.327, 0.62, 0.599, 0.486, 0.465, 0.698, 0.896, 0.52, 0.329, 0.54, 0.543,
        0.36, 0.53, 0.338, 0.59, 0.494, 0.548, 0.51, 0.349, 0.513, 0.625, 0.477, 0.335, 0.509, 0.422, 0.586, 0.904,
        0.546, 0.485, 0.462, 0.429, 0.197, 0.323, 0.356, 0.682, 0.506, 0.658, 0.68, 0.549, 0.559, 0.313, 0.312,
        0.335, 0.395, 0.618, 0.229, 0.553, 0.504, 0.604, 0.199, 0.667, 0.28, 0.588, 0.505, 0.367, 0.445, 0.323,
        0.29, 0.37, 0.403, 0.32, 0.209, 0.335, 0.411, 0.25]
P50 = [2.481, 1.73, 1.443, 0.999, 1.501, 0.932, 0.859, 0.69, 0.831, 1.049, 0.724, 2.197, 0.746, 0.813, 1.128,
       1.441, 1.198, 1.046, 8.791, 7.38, 2.324, 4.98, 0.894, 2.829, 1.366, 0.863, 2.365, 0.937, 1.465, 0.771,
       0.957, 0.76, 0.874, 1.186, 1.599, 1.552, 0.663, 0.735, 0.587, 0.692, 0.68, 0.772, 0.732, 0.513, 0.834,
       0.834, 0.764, 0.718, 0.697, 1.083, 0.697, 0.788, 0.679, 0.735, 0.695, 0.675, 0.698, 0.691, 0.688, 0.721]

# the default model at --optimizer adamw --lr 100 (prompt tuning, batch 4, 30 steps): blown up from step 2, then
# stuck near a loss of 1 with a prompt that scored 0.19 on 16 test reviews; no alarm before the early rule
ADAMW_LR100 = [2.384, 10.699, 7.987, 12.098, 8.411, 11.872, 3.512, 0.405, 1.541, 0.964, 1.032, 0.907, 1.536, 0.499,
               1.238, 1.998, 0.635, 0.938, 1.22, 1.043, 1.284, 0.807, 0.887, 0.82, 0.888, 0.685, 0.784, 0.194,
               1.116, 0.985]


def replay(losses: list[float]) -> list[int]:
    """Steps at which the default rule fires when fed a logged run (which goes on as logged)."""
    guard, fired = DivergenceGuard(), []
    for step, loss in enumerate(losses, 1):
        if guard.check_step(step, loss, 1.0):
            fired.append(step)
            guard.losses.append((step, loss))
    return fired


def test_rule_is_quiet_on_the_healthy_run_and_fires_on_the_collapse():
    assert replay(MAIN) == []  # single-batch spikes of 7x the running median do not fire
    assert replay(P50)[0] == 22  # the spikes of steps 19-22 stay up: the median of 5 steps is 4.7x


def test_a_blow_up_before_the_reference_fills_fires_against_the_highest_loss_so_far():
    """Before WARMUP reference losses exist the rise was not checked at all: a run at lr 100 that blew up at step
    2 went on unseen. Until then the window's median is held against the highest loss before it."""
    assert replay(ADAMW_LR100)[0] == 6  # steps 2-6: median 10.7 against the 2.38 of step 1
    guard = DivergenceGuard()
    for step, loss in enumerate([2.0, 1.0, 6.1, 6.1, 6.1, 6.1], 1):  # 6.1 > 3 x 2.0, the highest before the window
        fault = guard.check_step(step, loss, 1.0)
        assert (fault is None) == (step < 6)
    assert fault.first_suspect == 1 and "against at most 2 in the 1 before" in fault.reason
    guard = DivergenceGuard()
    for step, loss in enumerate([2.0, 1.0, 5.9, 5.9, 5.9, 5.9], 1):  # under 3 x 2.0: no alarm
        assert guard.check_step(step, loss, 1.0) is None
    guard = DivergenceGuard()  # back up to where it started: not against the median (1.0) of so few losses
    for step, loss in enumerate([3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.5, 3.5, 3.5, 3.5, 3.5], 1):
        assert guard.check_step(step, loss, 1.0) is None
    guard = DivergenceGuard()
    for step, loss in enumerate([0.1, 0.4, 0.4, 0.4, 0.4, 0.4], 1):  # 4x, but by 0.3 nats only
        assert guard.check_step(step, loss, 1.0) is None


def test_a_rise_right_after_a_rollback_goes_back_before_the_state_that_started_it():
    """The rise's first suspect state was taken as step - WINDOW, as if the window's 5 losses were 5 consecutive
    steps; after a rollback they are not (steps 26, 27, then 29-31), and the rollback returned to the very state
    (25) whose loss began the rising window."""
    guard = DivergenceGuard()
    method = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    for step in range(1, 28):  # steps 1..27 healthy; snapshots after 0, 5, ..., 25 updates
        guard.snapshot_if_due(step - 1, method, opt)
        assert guard.check_step(step, 1.0, 1.0) is None
    fault = guard.check_step(28, float("nan"), 1.0)
    assert fault.first_suspect == 27 and guard.rollback(28, fault, method, opt).rolled_back_to == 25
    assert [s for s, _ in guard.losses][-2:] == [26, 27]
    for step in (29, 30):
        assert guard.check_step(step, 50.0, 1.0) is None
    fault = guard.check_step(31, 50.0, 1.0)  # window: the losses of steps 26, 27, 29, 30, 31
    assert fault is not None and fault.first_suspect == 25  # the state that gave step 26's loss
    assert guard.rollback(31, fault, method, opt).rolled_back_to == 20


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def fault_hooks(plan: dict[int, str | float]):
    """Replacements for ``train.micro_batches`` and ``causal.target_loss`` that apply ``plan``:
    ``{step: "nan" | "nan_grad" | factor}``, what happens to the loss of each listed (1-based) step."""
    current = {"step": 0}
    batches, loss_fn = train_mod.micro_batches, causal.target_loss

    def tracked(*a, **kw):
        for step, epoch, group in batches(*a, **kw):
            current["step"] = step + 1
            yield step, epoch, group

    def faulty(*a, **kw):
        loss = loss_fn(*a, **kw)
        fault = plan.get(current["step"]) if torch.is_grad_enabled() else None  # validation runs without grad
        if fault == "nan":
            return loss * float("nan")
        if fault == "nan_grad":
            return NanGrad.apply(loss)
        return loss if fault is None else loss * fault

    return tracked, faulty


@pytest.fixture
def faults(monkeypatch):
    """The fault plan (see :func:`fault_hooks`), installed for the test; fill it in before training."""
    plan: dict[int, str | float] = {}
    tracked, faulty = fault_hooks(plan)
    monkeypatch.setattr(train_mod, "micro_batches", tracked)
    monkeypatch.setattr(causal, "target_loss", faulty)
    return plan


def rows_of(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["nan", "nan_grad"])
def test_non_finite_step_restores_the_snapshot_exactly_and_halves_the_lr(tmp_path, tokenizer, faults, kind,
                                                                         monkeypatch):
    model, ref_method = fresh(tokenizer)
    train(model, tokenizer, ref_method, task(), args(tmp_path / "ref", max_steps=12, optimizer="adamw",
                                                     schedule="linear"))
    optimizers, seen, build = [], {}, train_mod.build_optimizer
    monkeypatch.setattr(train_mod, "build_optimizer", lambda *a: optimizers.append(build(*a)) or optimizers[-1])
    model, method = fresh(tokenizer)

    def on_step(step):
        seen[step] = (method.embeddings.detach().clone(), copy.deepcopy(optimizers[0].state_dict()))

    faults[8] = kind
    result = train(model, tokenizer, method, task(), args(tmp_path / "run", max_steps=12, optimizer="adamw",
                                                          schedule="linear"), on_step=on_step)
    rows, ref = rows_of(tmp_path / "run"), rows_of(tmp_path / "ref")
    # the state after step 8 is the copy taken after step 5 (the newest older than the state that gave the NaN)
    assert rows[7]["event"] == "rollback" and rows[7]["rolled_back_to"] == 5 and rows[7]["lr_scale"] == 0.5
    prompt5, opt5 = seen[5]
    prompt8, opt8 = seen[8]
    assert torch.equal(prompt8, prompt5)
    assert opt8["state"].keys() == opt5["state"].keys()
    for i in opt5["state"]:
        for k in opt5["state"][i]:
            assert torch.equal(opt8["state"][i][k], opt5["state"][i][k]), k
    assert [r["loss"] for r in rows[:7]] == [r["loss"] for r in ref[:7]]
    # from step 8 on, the lr is half the schedule's; before, it is the schedule's
    assert [r["lr"] for r in rows[:7]] == [r["lr"] for r in ref[:7]]
    assert [r["lr"] for r in rows[7:]] == pytest.approx([r["lr"] / 2 for r in ref[7:]], rel=1e-12)
    assert [r.get("event") for r in rows].count("rollback") == 1
    assert (result.rollbacks, result.lr_scale, result.diverged, result.steps) == (1, 0.5, False, 12)
    assert torch.isfinite(method.embeddings).all()


def test_an_update_that_makes_the_prompt_non_finite_is_rolled_back(tmp_path, tokenizer, monkeypatch):
    """The loss and gradient of step 8 are finite, but its optimizer update writes inf into the prompt (as an
    overflowing update would): only the check after the update (``check_params``) sees it. Missed, the inf prompt
    was kept, checkpointed at step 8, and the next step's loss went NaN."""
    build = train_mod.build_optimizer
    calls = []

    def poisoned(*a):
        opt = build(*a)

        def after_step(optimizer, *_):
            calls.append(1)
            if len(calls) == 8:  # the update of step 8
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0][0, 0] = float("inf")

        opt.register_step_post_hook(after_step)
        return opt

    monkeypatch.setattr(train_mod, "build_optimizer", poisoned)
    model, method = fresh(tokenizer)
    saved, seen, checkpointed = [], {}, {}
    out = tmp_path / "run"

    def on_step(step):
        seen[step] = method.embeddings.detach().clone()
        ck = out / "checkpoint" / "method.safetensors"
        if ck.exists():
            checkpointed[step] = load_file(str(ck))["embeddings"]

    result = train(model, tokenizer, method, task(), args(out, max_steps=12, optimizer="adamw", lr=0.05,
                                                          schedule="constant", warmup_steps=0, eval_every=2,
                                                          checkpoint_every=4),
                   save_best=lambda m, metrics: saved.append(m.embeddings.detach().clone()), on_step=on_step)
    rows = rows_of(out)
    assert [(r["step"], r["event"]) for r in rows if "event" in r] == [(8, "rollback")]
    assert rows[7]["reason"] == "the update made the prompt non-finite"
    # every loss and gradient was finite, so the check before the update had nothing to see: every step stepped
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows) and len(calls) == 12
    # the state after step 8 is the copy taken after step 5 (the newest older than the state step 8 started from)
    assert rows[7]["rolled_back_to"] == 5 and torch.equal(seen[8], seen[5])
    assert [r["lr"] for r in rows[:7]] == [0.05] * 7
    assert [r["lr"] for r in rows[7:]] == pytest.approx([0.025] * 5, rel=1e-12)
    assert (result.rollbacks, result.lr_scale, result.diverged, result.steps) == (1, 0.5, False, 12)
    assert all(torch.isfinite(p).all() for p in seen.values())
    assert saved and all(torch.isfinite(p).all() for p in saved)
    assert sorted(checkpointed) == list(range(4, 13)) and all(torch.isfinite(p).all() for p in checkpointed.values())
    assert torch.isfinite(method.embeddings).all()


@pytest.mark.parametrize("kind", ["nan", "nan_grad"])
def test_with_the_guard_off_a_non_finite_step_is_skipped_and_ends_the_run(tmp_path, tokenizer, faults, kind):
    # off (compare's full fine-tuning, whose copies would swamp its memory column), it checked nothing: the NaN
    # update went in, training went on with NaN weights, and their argmax read as a majority-class accuracy
    model, method = fresh(tokenizer)
    seen = {}
    faults[6] = kind
    result = train(model, tokenizer, method, task(), args(tmp_path / "run", max_steps=12, optimizer="adamw",
                                                          divergence_guard=False),
                   on_step=lambda step: seen.__setitem__(step, method.embeddings.detach().clone()))
    rows = rows_of(tmp_path / "run")
    assert (result.diverged, result.steps, result.rollbacks) == (True, 6, 0)
    assert rows[-1]["event"] == "diverged" and rows[-1]["rolled_back_to"] == 5 and "non-finite" in rows[-1]["reason"]
    assert torch.equal(seen[6], seen[5]) and torch.isfinite(method.embeddings).all()  # the NaN step was skipped


def test_under_adafactor_a_rollback_halves_the_step_size_that_acts(tmp_path, tokenizer, faults):
    """torch's Adafactor steps min(lr, 1/sqrt(t)): at lr 0.9 the cap acts from step 2 on, and halving the lr
    (0.45, still above the cap) left the step size unchanged. The guard lowers the lr to half of what acts."""
    faults[8] = "nan"
    model, method = fresh(tokenizer)
    train(model, tokenizer, method, task(), args(tmp_path / "run", max_steps=12, optimizer="adafactor", lr=0.9,
                                                  schedule="constant", warmup_steps=0))
    rows = rows_of(tmp_path / "run")
    assert rows[7]["event"] == "rollback" and rows[7]["rolled_back_to"] == 5
    # the update logged at step 9 is the restored optimizer's 6th: it would have stepped min(0.9, 1/sqrt(6))
    acting = min(rows[8]["lr"], 1 / 6 ** 0.5)
    assert acting == pytest.approx(0.5 * min(0.9, 1 / 6 ** 0.5), rel=1e-6)


def test_a_rollback_on_a_validation_step_is_not_validated_as_that_step(tmp_path, tokenizer, faults):
    """The prompt after a rollback is an earlier step's: validated there, it was recorded (and saved as best/)
    as the prompt of the step that fired."""
    faults[6] = "nan"
    model, method = fresh(tokenizer)
    result = train(model, tokenizer, method, task(), args(tmp_path / "run", max_steps=12, eval_every=6))
    rows = rows_of(tmp_path / "run")
    assert rows[5]["event"] == "rollback" and not any(k.startswith("val_") for k in rows[5])
    assert "val_loss" in rows[11] and result.best_step == 12


def test_sustained_rise_rolls_back_before_it_and_the_run_goes_on(tmp_path, tokenizer, faults):
    model, method = fresh(tokenizer)
    faults.update({13: 20.0, 14: 20.0, 15: 20.0})
    result = train(model, tokenizer, method, task(), args(tmp_path, max_steps=20))
    rows = rows_of(tmp_path)
    events = [(r["step"], r["event"], r["rolled_back_to"]) for r in rows if "event" in r]
    # the window 11-15 has 3 of 5 losses at 20x; its first loss came from the state after 10 updates
    assert events == [(15, "rollback", 5)] and "the loss rose" in rows[14]["reason"]
    assert (result.rollbacks, result.diverged, result.steps) == (1, False, 20)


def test_persistent_divergence_stops_keeps_the_last_good_prompt_and_saves_no_nan(tmp_path, tokenizer, faults,
                                                                                caplog):
    model, method = fresh(tokenizer)
    saved = []
    good = {}
    faults.update({s: "nan" for s in range(9, 40)})
    result = train(model, tokenizer, method, task(), args(tmp_path, max_steps=30, eval_every=2, max_rollbacks=2),
                   save_best=lambda m, metrics: saved.append(m.embeddings.detach().clone()),
                   on_step=lambda s: good.setdefault(s, method.embeddings.detach().clone()))
    rows = rows_of(tmp_path)
    assert [(r["step"], r["event"]) for r in rows if "event" in r] == [(9, "rollback"), (10, "rollback"),
                                                                      (11, "diverged")]
    assert (result.diverged, result.steps, result.rollbacks, result.lr_scale) == (True, 11, 2, 0.25)
    assert torch.equal(method.embeddings.detach(), good[5])  # the copy older than step 8's state
    assert saved and all(torch.isfinite(p).all() for p in saved)
    ck = tmp_path / "checkpoint"
    assert torch.isfinite(load_file(str(ck / "method.safetensors"))["embeddings"]).all()
    assert json.loads((ck / "state.json").read_text())["step"] == 11
    assert "stopped: the run diverged again after 2 rollbacks" in caplog.text
    # resumed (say, killed during its final evaluation), it stays diverged: it trained on from step 11
    again = train(model, tokenizer, method, task(), args(tmp_path, max_steps=30, eval_every=2, max_rollbacks=2,
                                                         resume=True))
    assert (again.diverged, again.steps) == (True, 11) and torch.equal(method.embeddings.detach(), good[5])


def test_single_batch_spikes_do_not_fire_and_change_nothing(tmp_path, tokenizer, faults):
    """Spikes like the main command's (7x at step 15, 5x at step 20): the guard must not touch the run."""
    finals = []
    for guard in (False, True):
        faults.update({15: 7.0, 20: 5.0, 27: 6.0})
        model, method = fresh(tokenizer)
        train(model, tokenizer, method, task(), args(tmp_path / str(guard), max_steps=30, divergence_guard=guard))
        finals.append(method.embeddings.detach().clone())
        assert not any("event" in r for r in rows_of(tmp_path / str(guard)))
    assert torch.equal(finals[0], finals[1])


def test_guard_state_survives_resume(tmp_path, tokenizer, faults):
    """Rollbacks at steps 3 and 8, a checkpoint at 7, a kill at 9: the resume ends bit-identical.

    The second rollback restores the copy from step 5, older than the checkpoint: a resume that loses the
    copies or the lr multiplier ends elsewhere, one that loses the rollback count reports another.
    """
    def run(out, kill_at=None, resume=False, init_seed=0):
        faults.clear()
        faults.update({3: "nan", 8: "nan_grad"})
        model = make_model("llama")
        method = build_method("prompt_tuning", {"num_virtual_tokens": 4, "init": "random", "seed": init_seed},
                              model, tokenizer)

        def on_step(step):
            if step == kill_at:
                raise Killed

        try:
            result = train(model, tokenizer, method, task(), args(out, resume=resume, optimizer="adamw", lr=0.05,
                                                                  checkpoint_every=7, max_steps=12),
                           on_step=on_step)
        except Killed:
            return None, None
        return method.embeddings.detach().clone(), result

    straight, result = run(tmp_path / "a")
    assert (result.rollbacks, result.lr_scale) == (2, 0.25)
    assert run(tmp_path / "b", kill_at=9) == (None, None)
    resumed, result_b = run(tmp_path / "b", resume=True, init_seed=1)
    assert torch.equal(resumed, straight)
    assert (result_b.rollbacks, result_b.lr_scale) == (2, 0.25)
    log_a, log_b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    for key in ("step", "lr", "loss", "event", "rolled_back_to"):
        assert [r.get(key) for r in log_b] == [r.get(key) for r in log_a], key


def test_guard_flags_are_validated():
    with pytest.raises(ConfigError) as err:
        TrainArgs(spike_factor=1.0, max_rollbacks=-1)
    assert "--spike-factor must be > 1, got 1.0" in str(err.value)
    assert "--max-rollbacks must be >= 0, got -1" in str(err.value)
    assert TrainArgs().divergence_guard and TrainArgs().max_rollbacks == 5 and TrainArgs().spike_factor == 3.0


env = test_cli.env  # its tiny model folder and data files, for the CLI test


def test_cli_train_that_diverges_exits_1_keeps_a_finite_prompt_and_leaves_the_store_alone(env, tmp_path, faults):
    faults.update({s: "nan" for s in range(3, 40)})
    out, store = tmp_path / "run", tmp_path / "store"
    rc, stdout, stderr = run(train_argv(env, out, "--max-steps", "12", "--lr", "0.1", "--max-rollbacks", "1",
                                        "--init", "random", "--store", store, "--task", "sentiment"))
    assert rc == 1, stderr
    assert "the training diverged: the divergence guard stopped it at step 4 after 1 rollback(s)" in stderr
    assert "try: a lower --lr (e.g. 0.05)" in stderr and f"not added to --store {store}" in stderr
    assert "tuned soft prompt" in stdout and (out / "eval.json").exists()  # still evaluated
    prompt = load_file(str(out / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.isfinite(prompt).all()
    assert not store.exists()
    assert [json.loads(x).get("event") for x in (out / "metrics.jsonl").read_text().splitlines()][2:] == \
        ["rollback", "diverged"]
    # resumed (killed during the final evaluation, say), it stays diverged and says what it kept; with no
    # validation before the stop, the kept step is read from the log (the resumed run's history is empty)
    for name, extra, kept in (("run", [], "the best validation prompt (step 2)"),
                              ("late", ["--eval-every", "50"], "the last good prompt (step 0)")):
        argv = train_argv(env, tmp_path / name, "--max-steps", "12", "--lr", "0.1", "--max-rollbacks", "1",
                          "--init", "random", "--store", store, "--task", "sentiment", *extra)
        first = stderr if name == "run" else run(argv)[2]
        rc, _, again = run([*argv, "--resume"])
        assert rc == 1 and "Traceback" not in again and "stopped it at step 4" in again, again[-900:]
        assert f"kept: {kept}" in first and f"kept: {kept}" in again, again[-900:]
    assert not store.exists()


def test_data_parallel_ranks_take_the_same_decisions(tmp_path):
    """Faults on rank 1 only (a NaN gradient, then a sustained 20x loss): both ranks roll back, identically.

    Steps 13-15's 20x losses (on rank 1: 10.5x averaged) are three of the five in the window at step 15 (steps
    11-15), whose median is held against the highest of the 9 accepted losses before it (steps 1-3 and 5-10: the
    reference has not filled yet).
    """
    proc = torchrun("ddp_guard.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1] == {"rollbacks": 2, "lr_scale": 0.25}
    prompts = [load_file(str(tmp_path / f"rank{r}_of_2.safetensors"))["prompt"] for r in (0, 1)]
    assert torch.equal(prompts[0], prompts[1]) and torch.isfinite(prompts[0]).all()
    assert [(r["step"], r["event"]) for r in rows_of(tmp_path / "run") if "event" in r] == [(4, "rollback"),
                                                                                          (15, "rollback")]


def test_a_rollback_on_the_last_step_still_validates_the_state_the_run_keeps(tmp_path, tokenizer, faults):
    """A search run validates once, after its last step: a rollback there left it with no validation point at
    all, and compare ranked that lr with the crashed ones ("never validated")."""
    faults[12] = "nan"
    model, method = fresh(tokenizer)
    result = train(model, tokenizer, method, task(), args(tmp_path / "run", max_steps=12, eval_every=100))
    rows = rows_of(tmp_path / "run")
    assert rows[-1]["step"] == 12 and rows[-1].get("event") == "rollback" and "val_loss" in rows[-1]
    assert [r["step"] for r in rows if "val_loss" in r] == [12] and not result.diverged
