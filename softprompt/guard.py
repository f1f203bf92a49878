"""Divergence guard of the training loop: detect a diverging step, roll back to a good state, lower the lr.

Detection, per optimizer step, on the loss and the gradient norm the step would apply (in a data-parallel run
both are the all-reduced values, identical on every process, so every process takes the same decision):

- a non-finite loss or gradient norm (checked before the update, which is then skipped), or a prompt made
  non-finite by the update (checked after it);
- a sustained rise of the loss: the median loss of the last ``WINDOW`` steps is above ``spike_factor`` times
  the median of the (up to) ``REFERENCE`` accepted steps before them, and above it by at least ``MIN_RISE``
  nats, once ``WARMUP`` reference steps exist; before that (from the first full window on), above
  ``spike_factor`` times the *highest* loss before the window (a median of a few noisy steps is no reference,
  but a run whose loss stays at three times anything it started from has blown up: at ``--optimizer adamw --lr
  100`` the default model's loss went from 2.38 at step 1 to 10.7, 8.0, 12.1, 8.4, 11.9, and the run kept a
  prompt that scored 0.19 on 16 test reviews).

A single batch's loss or gradient-norm spike does not fire: healthy prompt-tuning runs have them (the main
command's run logs a loss of 9.05 against a running median near 1.3 at step 15 and a gradient norm of 101
against one near 6.6 at step 20, and still converges), and clipping already bounds what one batch can do to
the prompt. The median of a window ignores up to two such spikes in five steps; the gradient norm is not
used beyond its finiteness for the same reason (clipped, its size is not the size of the update). Replayed
on that run's log, the rule never fires (its largest window-median/reference-median ratio is 1.35, so the
default factor 3 leaves a wide margin); on compare's prompt tuning with P=50 at lr 0.3, which collapsed to
the majority class after losses of 8.8, 7.4, 2.3 and 5.0 at steps 19-22, it fires at step 22 (ratio 4.7),
and that run then ends at 0.81 test accuracy instead of 0.5075.

Recovery: the prompt and optimizer state are copied every ``SNAPSHOT_EVERY`` steps (at most two copies are
kept: for a prompt, a few hundred KiB; for methods that train model weights, two copies of those and of their
optimizer state).
On an alarm, the newest copy older than the evidence is restored (the loss of step ``s`` is measured on the
state after ``s - 1`` updates: for a sustained rise, a copy older than the state that gave the window's
first loss; for a non-finite value, older than the state that gave it), the offending update is not
applied, and the lr is halved through a multiplier on the schedule (its shape is kept). The data order,
step count and schedule go on; the evidence leaves the reference losses. After ``max_rollbacks``
rollbacks, the next alarm restores the copy and ends the run as diverged. Everything the guard keeps
(multiplier, counts, losses, copies) is part of the checkpoint, so a resumed run decides as the
uninterrupted one would.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass

import torch

WINDOW = 5  # steps whose median loss is compared: robust to up to 2 single-batch spikes
REFERENCE = 25  # accepted steps before the window that the comparison is against
WARMUP = 10  # reference steps needed before a rise is measured against their median (before: against their max)
MIN_RISE = 0.5  # nats: a rise from 0.01 to 0.05 is a ratio of 5 but no divergence
SNAPSHOT_EVERY = 5
LR_DECAY = 0.5


@dataclass
class Fault:
    """What :meth:`DivergenceGuard.check_step` or :meth:`DivergenceGuard.check_params` found."""

    reason: str
    first_suspect: int  # the oldest state (counted in updates) that gave evidence: older copies are safe


@dataclass
class Alarm:
    """One decision of the guard: why it fired, where it rolled back to, and whether the run must stop."""

    step: int
    reason: str
    rolled_back_to: int
    lr_scale: float
    rollbacks: int
    stop: bool
    off: bool = False  # the guard is off: the faulty update was skipped, with no copy to roll back to

    def record(self) -> dict:
        """The fields added to the step's line in ``metrics.jsonl``."""
        return {"event": "diverged" if self.stop else "rollback", "reason": self.reason,
                "rolled_back_to": self.rolled_back_to, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

    def message(self, max_rollbacks: int) -> str:
        """One console line."""
        if self.off:
            return (f"step {self.step}: {self.reason}; the update was skipped and the run stopped at step "
                    f"{self.rolled_back_to} (the divergence guard is off: no copies to roll back to)")
        if self.stop:
            return (f"step {self.step}: {self.reason}; restored the prompt of step {self.rolled_back_to} and "
                    f"stopped: the run diverged again after {max_rollbacks} rollbacks")
        return (f"step {self.step}: {self.reason}; rolled back to step {self.rolled_back_to}, skipped the update "
                f"and lowered the lr to x{self.lr_scale:g} of the schedule (rollback {self.rollbacks} of "
                f"{max_rollbacks})")


class DivergenceGuard:
    """Detects divergence and rolls the prompt and optimizer back (see the module docstring).

    Args:
        enabled: ``False`` keeps no copies and checks only that the loss and the gradient norm are finite: a
            non-finite one skips the update and stops the run (nothing to roll back to), instead of training on
            NaN weights whose predictions still read as a plausible accuracy; the lr multiplier (1 unless a
            resumed run had lowered it) still applies.
        spike_factor: how many times the reference median loss the window's median must exceed.
        max_rollbacks: rollbacks allowed; the next alarm ends the run.
    """

    def __init__(self, enabled: bool = True, spike_factor: float = 3.0, max_rollbacks: int = 5):
        self.enabled = enabled
        self.spike_factor = spike_factor
        self.max_rollbacks = max_rollbacks
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.losses: list[tuple[int, float]] = []  # (step, loss) of accepted steps, oldest first
        self.snapshots: list[dict] = []  # {"step", "method", "optimizer"}, oldest first

    def snapshot_if_due(self, step: int, method: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        """Copy the state after ``step`` updates when due (every ``SNAPSHOT_EVERY`` steps, and at the start)."""
        if not self.enabled or (self.snapshots and (step % SNAPSHOT_EVERY or self.snapshots[-1]["step"] == step)):
            return
        # keep the newest copy a future alarm may roll back to (one older than its window) and the newer ones;
        # dropped before copying, so at most two copies exist at any time
        older = [i for i, s in enumerate(self.snapshots) if s["step"] < step + 1 - WINDOW]
        del self.snapshots[:older[-1] if older else 0]
        self.snapshots.append({"step": step,
                               "method": {k: v.detach().clone() for k, v in method.state_dict().items()},
                               "optimizer": copy.deepcopy(opt.state_dict())})

    def check_step(self, step: int, loss: float, grad_norm: float) -> Fault | None:
        """Why step ``step`` (1-based) must not be applied, or ``None`` (then its loss is recorded).

        The loss of step ``s`` is measured on the state after ``s - 1`` updates: that state gave a non-finite
        value, and the states from the window's first step on gave a sustained rise.
        """
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            return Fault(f"non-finite {what} (loss {loss}, gradient norm {grad_norm})", step - 1)
        if not self.enabled:
            return None
        past = [x for _, x in self.losses]
        window = past[len(past) - (WINDOW - 1):] + [loss]
        reference = past[max(0, len(past) - (WINDOW - 1) - REFERENCE):len(past) - (WINDOW - 1)]
        if reference and len(window) == WINDOW:
            settled = len(reference) >= WARMUP  # else the early rule: against the highest loss so far
            now, ref = statistics.median(window), statistics.median(reference) if settled else max(reference)
            if now > self.spike_factor * ref and now - ref > MIN_RISE:
                # the window's first loss came from the state one update before its step; its steps need not be
                # consecutive (a rollback leaves a gap), so that step is read from the record, not step - WINDOW
                first = self.losses[len(self.losses) - (WINDOW - 1)][0] if WINDOW > 1 else step
                against = f"{ref:.4g} over" if settled else f"at most {ref:.4g} in"
                return Fault(f"the loss rose: median {now:.4g} over the last {WINDOW} steps against {against} "
                             f"the {len(reference)} before (--spike-factor {self.spike_factor:g})", first - 1)
        self.losses.append((step, loss))
        del self.losses[:-(REFERENCE + WINDOW)]
        return None

    def check_params(self, step: int, params: list[torch.Tensor]) -> Fault | None:
        """Why the parameters just updated by step ``step`` must not be kept (non-finite values), or ``None``."""
        if not self.enabled:
            return None
        with torch.no_grad():
            finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True
        return None if finite else Fault("the update made the prompt non-finite", step - 1)

    def rollback(self, step: int, fault: Fault, method: torch.nn.Module, opt: torch.optim.Optimizer) -> Alarm:
        """Restore the newest copy older than ``fault``'s evidence; lower the lr, or say the run must stop.

        Args:
            step: the 1-based step that fired.
            fault: what :meth:`check_step` or :meth:`check_params` found.
            method: restored in place.
            opt: restored in place, its lr too (the caller's next schedule step sets the lowered one).
        """
        if not self.enabled:  # no copies: the faulty update was not applied, and the run ends where it is
            return Alarm(step, fault.reason, step - 1, self.lr_scale, self.rollbacks, True, off=True)
        i = self._target_index(fault.first_suspect)
        snap = self.snapshots[i]
        del self.snapshots[i + 1:]
        method.load_state_dict(snap["method"])
        # deep copies: the optimizer updates its state tensors in place, and the copy may be restored again
        opt.load_state_dict(copy.deepcopy(snap["optimizer"]))
        # the evidence leaves the reference; losses of older states stay (they were healthy measurements)
        self.losses = [(s, x) for s, x in self.losses if s <= fault.first_suspect]
        stop = self.rollbacks >= self.max_rollbacks
        if not stop:
            self.rollbacks += 1
            self.lr_scale *= LR_DECAY * _acting_fraction(opt)
        return Alarm(step, fault.reason, snap["step"], self.lr_scale, self.rollbacks, stop)

    def _target_index(self, first_suspect: int) -> int:
        """Index of the newest copy older than the state after ``first_suspect`` updates (else the oldest)."""
        older = [i for i, s in enumerate(self.snapshots) if s["step"] < first_suspect]
        return older[-1] if older else 0

    def state(self) -> dict:
        """JSON part of the checkpoint."""
        return {"lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "losses": self.losses}

    def load_state(self, state: dict | None, snapshots: list[dict] | None) -> None:
        """Restore :meth:`state` and the copies (absent in checkpoints written before the guard existed)."""
        if state:
            self.lr_scale, self.rollbacks = float(state["lr_scale"]), int(state["rollbacks"])
            self.losses = [(int(s), float(x)) for s, x in state["losses"]]
        self.snapshots = list(snapshots or [])


def _acting_fraction(opt: torch.optim.Optimizer) -> float:
    """The part of the optimizer's lr that acts on its next step: 1, except for torch's Adafactor, whose step
    size is ``min(lr, 1/sqrt(t))`` (times the parameters' RMS). Above that cap, halving the lr changes nothing
    (lr 0.3 is capped from step 12 on): the guard then lowers the lr to half of the step size that acts."""
    adafactor = getattr(torch.optim, "Adafactor", None)  # torch >= 2.5
    if adafactor is None or not isinstance(opt, adafactor):
        return 1.0
    group = opt.param_groups[0]
    steps = [float(opt.state[p]["step"]) for p in group["params"] if "step" in opt.state.get(p, {})]
    cap = 1 / ((max(steps, default=0.0) + 1) ** 0.5)
    return min(1.0, cap / group["lr"]) if group["lr"] > 0 else 1.0
